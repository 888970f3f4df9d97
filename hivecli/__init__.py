"""hive: collaborative, decentralized deep learning over an embedded DHT.

`import hivecli as hivemind` runs code written for hivemind's quick-start. Importing this
package does not import torch; the training pieces load it when first used.
"""

from hivecli._exceptions import (
    BootstrapError,
    ConfigError,
    ConnectionClosedError,
    DHTError,
    FrameTooLargeError,
    HandshakeError,
    HiveError,
    MalformedFrameError,
    MultiaddrError,
    PeerUnreachableError,
    ProtocolError,
    RemoteError,
    ResourceExhaustedError,
    RPCError,
    RPCTimeoutError,
)
from hivecli.dht import DHT, DHTSettings, ValueWithExpiration
from hivecli.net import Multiaddr, NetSettings, PeerID
from hivecli.utils.timing import get_dht_time

__version__ = "0.1.0"

__all__ = [
    "BootstrapError",
    "ConfigError",
    "ConnectionClosedError",
    "DHT",
    "DHTError",
    "DHTSettings",
    "FrameTooLargeError",
    "HandshakeError",
    "HiveError",
    "MalformedFrameError",
    "Multiaddr",
    "MultiaddrError",
    "NetSettings",
    "PeerID",
    "PeerUnreachableError",
    "ProtocolError",
    "RPCError",
    "RPCTimeoutError",
    "RemoteError",
    "ResourceExhaustedError",
    "ValueWithExpiration",
    "__version__",
    "get_dht_time",
]
