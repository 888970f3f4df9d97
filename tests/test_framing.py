"""Frame encoding and decoding, size limits checked before reading, hostile msgpack."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest

from hivecli._exceptions import FrameTooLargeError, MalformedFrameError, ProtocolError
from hivecli.net.framing import PREFIX, FrameLimits, encode_frame, pack, read_frame, unpack
from hivecli.net.transport import ByteStream

DEADLINE = 2.0


class ReaderStream(ByteStream):
    """A ByteStream that reads from an asyncio.StreamReader the test feeds by hand."""

    remote_host = "test"

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.requested: list[int] = []  # every read_exactly size, to prove what was (not) read

    def feed(self, data: bytes) -> None:
        self.reader.feed_data(data)

    async def read_exactly(self, n: int) -> bytes:
        self.requested.append(n)
        return await self.reader.readexactly(n)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.feed(bytes(data))  # loop back: what is written can be read

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.reader.feed_eof()

    def is_closing(self) -> bool:
        return self.reader.at_eof()


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), 10))


def prefix(header_len: int, body_len: int) -> bytes:
    return struct.pack(">II", header_len, body_len)


async def read_within_deadline(stream: ReaderStream, limits: FrameLimits) -> tuple[Any, bytes]:
    return await asyncio.wait_for(read_frame(stream, limits), DEADLINE)


# ---- round trips ----------------------------------------------------------------------------

HEADERS = [
    [0, 2, "echo", {"a": 1, "b": [1, 2, 3]}],
    {"protocol": "hive", "version": 1, "nonce": bytes(range(32)), "listen": ["/ip4/1.2.3.4/tcp/5"]},
    {1: "int keys are allowed", -5: None},
    "unicode ✓ ünïcødé",
    None,
    True,
    2**63 - 1,
    -(2**63),
    3.25,
    b"\x00\xff" * 100,
    [],
    {},
]


@pytest.mark.parametrize("header", HEADERS, ids=range(len(HEADERS)))
@pytest.mark.parametrize("body", [b"", b"x", bytes(range(256)) * 1000], ids=["no-body", "1B", "256kB"])
def test_round_trip(header: Any, body: bytes) -> None:
    async def main() -> None:
        stream = ReaderStream()
        for chunk in encode_frame(header, body):
            stream.write(chunk)
        got_header, got_body = await read_within_deadline(stream, FrameLimits())
        assert got_header == header
        assert type(got_header) is type(header)
        assert got_body == body
        assert stream.reader._buffer == b""  # exactly one frame consumed, nothing left over

    run(main)


def test_round_trip_of_several_frames_and_buffer_types() -> None:
    async def main() -> None:
        stream = ReaderStream()
        frames = [
            ([1, 0, "a"], b"first"),
            ([1, 0, "b"], bytearray(b"second")),
            ([1, 0, "c"], memoryview(b"third body")),
            ((2, 0), b""),
        ]
        for header, body in frames:
            head, tail = encode_frame(header, body)
            stream.write(head)
            stream.write(tail)
        for header, body in frames:
            got_header, got_body = await read_within_deadline(stream, FrameLimits())
            assert got_header == list(header)  # msgpack has one sequence type
            assert got_body == bytes(body)

    run(main)


def test_encode_frame_layout() -> None:
    head, body = encode_frame({"k": "v"}, b"BODY")
    header_bytes = msgpack.packb({"k": "v"}, use_bin_type=True)
    assert head == PREFIX.pack(len(header_bytes), 4) + header_bytes
    assert head[:8] == struct.pack(">II", len(header_bytes), 4)
    assert body == b"BODY"


def test_frame_arriving_in_pieces() -> None:
    async def main() -> None:
        stream = ReaderStream()
        head, body = encode_frame(["split", 1], b"0123456789")
        data = head + body
        task = asyncio.ensure_future(read_frame(stream, FrameLimits()))
        for i in range(len(data)):
            await asyncio.sleep(0)
            assert not task.done()
            stream.feed(data[i : i + 1])
        assert await asyncio.wait_for(task, DEADLINE) == (["split", 1], b"0123456789")

    run(main)


def test_pack_rejects_non_msgpack_values() -> None:
    with pytest.raises(TypeError):
        pack({"obj": object()})
    with pytest.raises(TypeError):
        pack({1, 2})


# ---- size limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header_len", "body_len", "what"),
    [
        (100 * 1024 * 1024, 0, "frame header of 104857600 bytes exceeds the limit of 4194304 bytes"),
        (2**32 - 1, 0, "frame header of 4294967295 bytes"),
        (4 * 1024 * 1024 + 1, 0, "frame header of 4194305 bytes"),
        (10, 64 * 1024 * 1024 + 1, "frame body of 67108865 bytes exceeds the limit of 67108864 bytes"),
        (10, 2**32 - 1, "frame body of 4294967295 bytes"),
    ],
)
def test_oversized_frame_is_rejected_from_the_prefix_alone(header_len: int, body_len: int, what: str) -> None:
    """Only the 8-byte prefix is available: the reader must fail at once, not wait for more."""

    async def main() -> None:
        stream = ReaderStream()
        stream.feed(prefix(header_len, body_len) + b"rest")
        with pytest.raises(FrameTooLargeError) as info:
            await read_within_deadline(stream, FrameLimits())
        assert what in str(info.value)
        assert stream.requested == [8]  # nothing of the frame was read past the prefix
        assert await stream.reader.readexactly(4) == b"rest"

    run(main)


def test_limits_are_inclusive_and_configurable() -> None:
    async def main() -> None:
        limits = FrameLimits(max_header_bytes=16, max_body_bytes=32)
        header = "x" * 15  # msgpack fixstr: 1 byte of tag + 15 = 16 bytes, exactly at the limit
        assert len(pack(header)) == 16
        stream = ReaderStream()
        for chunk in encode_frame(header, b"b" * 32):
            stream.write(chunk)
        assert await read_within_deadline(stream, limits) == (header, b"b" * 32)

        stream = ReaderStream()
        for chunk in encode_frame("x" * 16, b""):
            stream.write(chunk)
        with pytest.raises(FrameTooLargeError, match="17 bytes exceeds the limit of 16"):
            await read_within_deadline(stream, limits)

        stream = ReaderStream()
        for chunk in encode_frame("ok", b"b" * 33):
            stream.write(chunk)
        with pytest.raises(FrameTooLargeError, match="33 bytes exceeds the limit of 32"):
            await read_within_deadline(stream, limits)

    run(main)


def test_frame_too_large_is_a_protocol_error() -> None:
    assert issubclass(FrameTooLargeError, ProtocolError)
    assert issubclass(MalformedFrameError, ProtocolError)


# ---- malformed headers ----------------------------------------------------------------------

MALFORMED_HEADERS = {
    "reserved-byte-c1": b"\xc1",
    "truncated-array": b"\x93\x01\x02",
    "truncated-str": b"\xa5ab",
    "extra-data": b"\x01\x02",
    "empty": b"",
    "invalid-utf8": b"\xa2\xff\xfe",
    "ext-type-5": msgpack.packb(msgpack.ExtType(5, b"payload")),
    "ext-type-in-list": msgpack.packb([0, 1, "m", msgpack.ExtType(42, b"")]),
    "ext-type-timestamp": msgpack.packb(msgpack.Timestamp(1_700_000_000, 0)),
    "ext-type-timestamp-nested": msgpack.packb({"when": msgpack.Timestamp(1, 0)}),
    "ext-type-timestamp-deep-in-lists": msgpack.packb([1.5, [2, "x", [3, msgpack.Timestamp(1, 0)]]]),
    "ext-type-timestamp-as-map-key": msgpack.packb({"k": {msgpack.Timestamp(1, 0): 1}}),
}


@pytest.mark.parametrize("raw_header", MALFORMED_HEADERS.values(), ids=MALFORMED_HEADERS.keys())
def test_malformed_header_raises_malformed_frame_error(raw_header: bytes) -> None:
    async def main() -> None:
        stream = ReaderStream()
        stream.feed(prefix(len(raw_header), 0) + raw_header)
        with pytest.raises(MalformedFrameError):
            await read_within_deadline(stream, FrameLimits())

    run(main)


def test_ext_type_error_names_the_code() -> None:
    with pytest.raises(MalformedFrameError, match="extension type 7 is not allowed"):
        unpack(msgpack.packb(msgpack.ExtType(7, b"")))


def test_unpack_error_names_the_msgpack_failure() -> None:
    with pytest.raises(MalformedFrameError, match="undecodable msgpack"):
        unpack(b"\xc1")


def test_stream_ending_mid_frame_is_an_incomplete_read() -> None:
    async def main() -> None:
        for cut in (3, 8, 10):
            stream = ReaderStream()
            head, body = encode_frame(["x"], b"body")
            stream.feed((head + body)[:cut])
            stream.close()
            with pytest.raises(asyncio.IncompleteReadError):
                await read_within_deadline(stream, FrameLimits())

    run(main)


# ---- the structure check's fast path --------------------------------------------------------


def _nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("leaf", [1, b"\xd6\xff" * 8, "\x90\x91\xdc"])
def test_nesting_is_limited_whatever_the_leaf_bytes(leaf):
    """`unpack` walks only values whose bytes could nest too deep or hold a timestamp: the limit
    holds exactly, with leaves whose own bytes look like markers or not."""
    from hivecli.net.framing import MAX_NESTING

    assert unpack(pack(_nested(MAX_NESTING, leaf))) == _nested(MAX_NESTING, leaf)
    with pytest.raises(MalformedFrameError, match="nested more than"):
        unpack(pack(_nested(MAX_NESTING + 1, leaf)))


def test_unpack_rejects_exactly_what_the_walk_rejects():
    """Fuzzed values with timestamps, bytes and nesting: the fast path never lets through what
    the full walk refuses, and refuses nothing it accepts."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from hivecli.net.framing import MAX_NESTING, _check_structure

    leaves = st.one_of(
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=8),
        st.binary(max_size=16),
        st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)),
    )
    values = st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
        max_leaves=40,
    )

    def walked(value: Any, nesting: int) -> bool:
        try:
            _check_structure(value, nesting)
        except MalformedFrameError:
            return False
        return True

    @settings(max_examples=400, deadline=None)
    @given(values, st.integers(1, MAX_NESTING))
    def check(value: Any, nesting: int) -> None:
        data = msgpack.packb(value, use_bin_type=True)
        try:
            unpack(data, nesting)
            accepted = True
        except MalformedFrameError:
            accepted = False
        assert accepted == walked(msgpack.unpackb(data, raw=False, strict_map_key=False), nesting)

    check()
