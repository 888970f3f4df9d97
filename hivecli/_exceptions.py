"""Every error hive raises on purpose, drawn once:

    HiveError
    ├── ConfigError (ValueError)         bad user input: a setting, a recipe field, a flag
    │   └── MultiaddrError               a string that is not a usable multiaddr
    ├── ProtocolError                    a peer broke the wire protocol
    │   ├── FrameTooLargeError           a frame's declared size is over the limit
    │   ├── MalformedFrameError          a frame that does not decode
    │   └── HandshakeError               identity proof or protocol version failed
    ├── PeerUnreachableError             could not connect to a peer (refused, timed out, wrong peer)
    ├── RPCError                         a call reached the peer but did not succeed
    │   ├── RemoteError                  the remote handler raised; carries its message
    │   └── RPCTimeoutError (TimeoutError)
    ├── ConnectionClosedError            the connection went away while we were using it
    ├── ResourceExhaustedError           this process is out of something (file descriptors)
    └── DHTError
        └── BootstrapError (PeerUnreachableError)   none of the initial peers answered

Messages are full sentences that name the offending value and say what to do about it.
The CLI maps each family to an exit code in one table (`hivecli/cli/_errors.py`).
"""

from __future__ import annotations


class HiveError(Exception):
    """Base class of all errors raised by hivecli on purpose."""


class ConfigError(HiveError, ValueError):
    """A setting, flag or recipe field has a value we cannot use."""


class MultiaddrError(ConfigError):
    """A string is not a valid multiaddr (or lacks a part the caller needs)."""


class ProtocolError(HiveError):
    """A peer sent something that breaks the hive wire protocol."""


class FrameTooLargeError(ProtocolError):
    """A frame header declared more bytes than the configured limit allows."""


class MalformedFrameError(ProtocolError):
    """A frame's bytes do not decode to a valid message."""


class HandshakeError(ProtocolError):
    """The connection handshake failed: wrong peer, bad signature or incompatible version."""


class PeerUnreachableError(HiveError):
    """We could not open a working connection to a peer."""


class RPCError(HiveError):
    """A remote procedure call reached the peer but did not produce a result."""


class RemoteError(RPCError):
    """The remote handler raised an error; the message is the remote's one-line description."""


class RPCTimeoutError(RPCError, TimeoutError):
    """A call did not get its response before its deadline."""


class ConnectionClosedError(HiveError):
    """The connection was closed while a call or stream was still using it."""


class ResourceExhaustedError(HiveError):
    """This process ran out of a local resource, such as file descriptors; no peer is at fault."""


class DHTError(HiveError):
    """A DHT operation could not be carried out."""


class BootstrapError(DHTError, PeerUnreachableError):
    """None of the initial peers answered, so the node cannot join the DHT."""


class AveragingError(HiveError):
    """Decentralized averaging could not complete."""


class MatchmakingError(AveragingError, TimeoutError):
    """No group of at least `min_group_size` peers formed before the step's timeout."""


class AllreduceError(AveragingError):
    """An all-reduce round failed as a whole (every other peer was lost, or it timed out)."""


class StateDownloadError(AveragingError):
    """No peer could provide its state (none declared, or every download failed)."""


__all__ = [
    "AllreduceError",
    "AveragingError",
    "BootstrapError",
    "ConfigError",
    "ConnectionClosedError",
    "DHTError",
    "FrameTooLargeError",
    "HandshakeError",
    "HiveError",
    "MalformedFrameError",
    "MatchmakingError",
    "MultiaddrError",
    "PeerUnreachableError",
    "ProtocolError",
    "RPCError",
    "RPCTimeoutError",
    "RemoteError",
    "ResourceExhaustedError",
    "StateDownloadError",
]
