"""Length-prefixed frames: a msgpack header plus an optional raw-bytes body.

    +----------------+--------------+----------------------+------------------+
    | header_len u32 | body_len u32 | header (msgpack)     | body (raw bytes) |
    +----------------+--------------+----------------------+------------------+

The body carries bulk data (tensor bytes, DHT values) without msgpack's copy and lets a reader
receive into a buffer it owns. Both lengths are checked against `FrameLimits` before a single
byte of the frame is read, so a peer cannot make us allocate more than the limits. Headers are
decoded with msgpack only: never pickle, no extension types.
"""

from __future__ import annotations

import reprlib
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from hivecli._exceptions import FrameTooLargeError, MalformedFrameError
from hivecli.net.transport import ByteStream

PREFIX = struct.Struct(">II")


@dataclass(frozen=True)
class FrameLimits:
    """Upper bounds on what one frame may declare.

    Attributes:
        max_header_bytes: largest msgpack header (default 4 MiB, as libp2p's default message).
        max_body_bytes: largest raw body (default 64 MiB); larger payloads are streamed in chunks.
    """

    max_header_bytes: int = 4 * 1024 * 1024
    max_body_bytes: int = 64 * 1024 * 1024


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedFrameError(f"msgpack extension type {code} is not allowed on the hive wire")


def pack(obj: Any) -> bytes:
    """Serialize a msgpack-native value. Raises TypeError for values msgpack cannot encode."""
    return msgpack.packb(obj, use_bin_type=True)


MAX_NESTING = 32
"""Deepest list/map nesting `unpack` accepts. Hive's own messages nest a handful of levels; a
peer's 1,000-deep list decodes fine but then overflows the stack in anything recursive that
touches it (repr, ==, a handler walking it), so it is refused at the door."""


def unpack(data: bytes, max_nesting: int = MAX_NESTING) -> Any:
    """Deserialize bytes that came from the network.

    Raises:
        MalformedFrameError: the bytes do not decode, use a msgpack extension type, or nest
            lists/maps more than `max_nesting` levels deep.
    """
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_reject_ext)
    except MalformedFrameError:
        raise
    except Exception as e:  # msgpack raises a zoo of ValueError/TypeError/ExtraData/FormatError/StackError
        raise MalformedFrameError(f"undecodable msgpack ({type(e).__name__}: {e})") from None
    if type(value) in _WALKED:
        # Only a value whose bytes could hold what the walk rejects is walked: a timestamp needs
        # an extension marker byte, and each level of nesting a container marker byte. Most frames
        # (a chunk's [index, meta], a "ready") have no extension marker and a few containers.
        markers = data.translate(None, _NOT_A_MARKER) if isinstance(data, (bytes, bytearray)) else None
        if markers is None or _EXT_MARKERS.intersection(markers) or len(markers) > max_nesting:
            _check_structure(value, max_nesting)
    return value


def _check_structure(value: Any, max_nesting: int) -> None:
    """Walk a decoded value without recursion (a hostile depth cannot overflow our stack) and
    reject timestamps, which msgpack decodes itself without calling ext_hook. Each container's
    elements are classified by type in one C-level pass (`_WALKED.isdisjoint(map(type, ...))`),
    and only the containers among them are walked: a list of a million numbers costs no Python
    loop.

    Raises:
        MalformedFrameError: nesting deeper than `max_nesting`, or a msgpack Timestamp.
    """
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if type(item) is msgpack.Timestamp:
            raise MalformedFrameError("msgpack extension type -1 (timestamp) is not allowed on the hive wire")
        if type(item) is not list and type(item) is not dict:
            continue
        if depth >= max_nesting:
            raise MalformedFrameError(f"msgpack nested more than {max_nesting} levels deep")
        children = item if type(item) is list else (*item.keys(), *item.values())
        if not _WALKED.isdisjoint(map(type, children)):
            pending.extend((child, depth + 1) for child in children if type(child) in _WALKED)


_WALKED = frozenset({list, dict, msgpack.Timestamp})  # what `_check_structure` looks into or rejects

# msgpack's first bytes of an extension (fixext 1-16, ext 8/16/32) and of a container (fixmap,
# fixarray, array 16/32, map 16/32). Either may also occur inside a string, a number or bytes:
# then `unpack` walks the value, which is what decides.
_EXT_MARKERS = frozenset([0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8])
_CONTAINER_MARKERS = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_NOT_A_MARKER = bytes(b for b in range(256) if b not in _EXT_MARKERS | _CONTAINER_MARKERS)


class _ShortRepr(reprlib.Repr):
    """reprlib with few elements and levels, and bytes cut before they are formatted (reprlib
    would format a whole 4 MiB bytes value and only then cut the text)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = self.maxother = 60

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")


_SHORT_REPR = _ShortRepr()


def describe(value: Any, limit: int = 80) -> str:
    """A short, safe rendering of a value that came from the network, for errors and logs.

    Unlike `str(value)[:limit]` it never formats more than a few elements (a 4 MiB header is
    not turned into a 4 MiB string first) and never recurses deeper than a few levels.
    """
    if isinstance(value, str):
        text = value[:limit]
    elif isinstance(value, (bytes, bytearray)):
        text = _SHORT_REPR.repr_bytes(bytes(value[:limit]), 0)
    else:
        text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_frame(
    header: Any, body: bytes | bytearray | memoryview = b""
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """Return (prefix + header, body): write both, in order, without awaiting in between."""
    header_bytes = pack(header)
    body_len = body.nbytes if isinstance(body, memoryview) else len(body)
    return PREFIX.pack(len(header_bytes), body_len) + header_bytes, body


async def read_header(stream: ByteStream, limits: FrameLimits) -> tuple[Any, int]:
    """Read a frame's prefix and header; return (header, body_len) and leave the body unread,
    so the caller can receive it where it belongs (`ByteStream.read_into`).

    Raises:
        FrameTooLargeError: a declared length is over `limits` (nothing of the frame was read).
        MalformedFrameError: the header is not valid msgpack.
        asyncio.IncompleteReadError: the stream ended mid-frame.
    """
    header_len, body_len = PREFIX.unpack(await stream.read_exactly(PREFIX.size))
    if header_len > limits.max_header_bytes:
        raise FrameTooLargeError(
            f"frame header of {header_len} bytes exceeds the limit of {limits.max_header_bytes} bytes"
        )
    if body_len > limits.max_body_bytes:
        raise FrameTooLargeError(
            f"frame body of {body_len} bytes exceeds the limit of {limits.max_body_bytes} bytes; "
            f"large payloads must be streamed in chunks"
        )
    return unpack(await stream.read_exactly(header_len)), body_len


async def read_frame(stream: ByteStream, limits: FrameLimits) -> tuple[Any, bytes]:
    """Read one whole frame. Raises what `read_header` raises."""
    header, body_len = await read_header(stream, limits)
    body = await stream.read_exactly(body_len) if body_len else b""
    return header, body
