"""Decentralized averaging: matchmaking through the DHT, butterfly all-reduce, state sharing."""

from hivecli._exceptions import AllreduceError, AveragingError, MatchmakingError, StateDownloadError
from hivecli.averaging.averager import DecentralizedAverager, Stage, StepControl
from hivecli.averaging.compression import (
    Blockwise8BitQuantization,
    Codec,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    get_codec,
)
from hivecli.averaging.partition import load_balance
from hivecli.averaging.settings import AveragingSettings

__all__ = [
    "AllreduceError",
    "AveragingError",
    "AveragingSettings",
    "Blockwise8BitQuantization",
    "Codec",
    "DecentralizedAverager",
    "Float16Compression",
    "MatchmakingError",
    "NoCompression",
    "Stage",
    "StateDownloadError",
    "StepControl",
    "Uniform8BitQuantization",
    "get_codec",
    "load_balance",
]
