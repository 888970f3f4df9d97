"""hive's own networking: identities, multiaddrs, frames, authenticated connections and RPC."""

from hivecli.net.connection import Connection, Message, NetSettings, Reply, Stream
from hivecli.net.framing import FrameLimits
from hivecli.net.host import Host
from hivecli.net.identity import Identity, PeerID
from hivecli.net.multiaddr import Multiaddr, parse_peer_maddr
from hivecli.net.tcp import TCPTransport
from hivecli.net.transport import ByteStream, MemoryTransport, Transport

__all__ = [
    "ByteStream",
    "Connection",
    "FrameLimits",
    "Host",
    "Identity",
    "MemoryTransport",
    "Message",
    "Multiaddr",
    "NetSettings",
    "PeerID",
    "Reply",
    "Stream",
    "TCPTransport",
    "Transport",
    "parse_peer_maddr",
]
