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


def _reject_timestamp(value: Any) -> None:
    # msgpack decodes extension -1 (Timestamp) itself, without calling ext_hook
    if type(value) is msgpack.Timestamp:
        raise MalformedFrameError("msgpack extension type -1 (timestamp) is not allowed on the hive wire")


def _checked_list(items: list[Any]) -> list[Any]:
    for item in items:
        _reject_timestamp(item)
    return items


def _checked_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    for key, value in pairs:
        _reject_timestamp(key)
        _reject_timestamp(value)
    return dict(pairs)


def unpack(data: bytes) -> Any:
    """Deserialize bytes that came from the network. Raises MalformedFrameError if they do not decode."""
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            ext_hook=_reject_ext,
            list_hook=_checked_list,
            object_pairs_hook=_checked_map,
        )
        _reject_timestamp(value)
        return value
    except MalformedFrameError:
        raise
    except Exception as e:  # msgpack raises a zoo of ValueError/TypeError/ExtraData/FormatError
        raise MalformedFrameError(f"undecodable msgpack ({type(e).__name__}: {e})") from None


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
