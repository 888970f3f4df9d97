"""hive: collaborative, decentralized deep learning over an embedded DHT.

`import hivecli as hivemind` runs code written for hivemind's quick-start. Importing this
package does not import torch; the training pieces load it when first used.
"""

from typing import Any as _Any

from hivecli._exceptions import (
    AllreduceError,
    AveragingError,
    BootstrapError,
    ConfigError,
    ConnectionClosedError,
    DHTError,
    FrameTooLargeError,
    HandshakeError,
    HiveError,
    MalformedFrameError,
    MatchmakingError,
    MultiaddrError,
    PeerUnreachableError,
    ProtocolError,
    RemoteError,
    ResourceExhaustedError,
    RPCError,
    RPCTimeoutError,
    StateDownloadError,
)
from hivecli.dht import DHT, DHTSettings, ValueWithExpiration
from hivecli.net import Multiaddr, NetSettings, PeerID
from hivecli.utils.timing import get_dht_time

__version__ = "0.1.0"

# names that need torch: imported on first use, so that `hive --help` and DHT-only peers stay light
_LAZY = {
    "AveragingSettings": "hivecli.averaging",
    "DecentralizedAverager": "hivecli.averaging",
    "DecentralizedOptimizer": "hivecli.optim",
    "DiLoCoOptimizer": "hivecli.optim",
    "Optimizer": "hivecli.optim",
    "TrainingAverager": "hivecli.optim",
}


_LAZY_MODULES = {"averaging", "optim"}  # `hivemind.optim.DecentralizedOptimizer` works after `import hivecli`


def __getattr__(name: str) -> _Any:
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"hivecli.{name}")
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hivecli' has no attribute {name!r}")


__all__ = [
    "AllreduceError",
    "AveragingError",
    "AveragingSettings",
    "BootstrapError",
    "ConfigError",
    "ConnectionClosedError",
    "DHT",
    "DHTError",
    "DHTSettings",
    "DecentralizedAverager",
    "DecentralizedOptimizer",
    "DiLoCoOptimizer",
    "FrameTooLargeError",
    "HandshakeError",
    "HiveError",
    "MalformedFrameError",
    "MatchmakingError",
    "Multiaddr",
    "MultiaddrError",
    "NetSettings",
    "Optimizer",
    "PeerID",
    "PeerUnreachableError",
    "ProtocolError",
    "RPCError",
    "RPCTimeoutError",
    "RemoteError",
    "ResourceExhaustedError",
    "StateDownloadError",
    "TrainingAverager",
    "ValueWithExpiration",
    "__version__",
    "get_dht_time",
]
