"""Decentralized averaging: matchmaking through the DHT, butterfly all-reduce, state sharing."""

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
    "AveragingSettings",
    "Blockwise8BitQuantization",
    "Codec",
    "DecentralizedAverager",
    "Float16Compression",
    "NoCompression",
    "Stage",
    "StepControl",
    "Uniform8BitQuantization",
    "get_codec",
    "load_balance",
]
