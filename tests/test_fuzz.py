"""Fuzzing a live node through the wire: frames and RPC arguments a hostile peer could send.

One node (a DHT peer with an averager, so every hive method is served) runs in its own thread.
A hostile peer with a real, authenticated and encrypted connection sends it thousands of
generated frames: random msgpack headers, well-formed frames of every kind with random
fields, and requests to every method with random payloads and bodies. The node may answer,
refuse or hang up on the hostile connection (it reconnects), but it must stay up, keep its
memory bounded, log no traceback, and answer an honest peer at the end.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivecli import DHT
from hivecli.averaging import DecentralizedAverager
from hivecli.net.framing import FrameLimits, read_frame
from hivecli.net.transport import ByteStream
from hivecli.testing import HostilePeer
from hivecli.utils.timing import get_dht_time

METHODS = ["dht.ping", "dht.store", "dht.find", "dht.peers", "avg.join/fuzz", "avg.part/fuzz", "avg.state/fuzz", "nope"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(scalars, inner, max_size=5),
    max_leaves=20,
)


# DHT and averaging requests with plausible field names and hostile field values
payloads = values | st.fixed_dictionaries(
    {},
    optional={
        "node": st.binary(min_size=0, max_size=24) | values,
        "keys": st.lists(st.binary(min_size=20, max_size=20) | values, max_size=8),
        "items": st.lists(st.lists(values, max_size=7), max_size=6),
        "member": values,
        "expiration": values,
        "group_key": values,
        "schema_hash": values,
        "group_id": st.binary(max_size=24) | values,
        "sender": values,
        "weight": values,
    },
)
frames = st.one_of(
    st.tuples(values, st.binary(max_size=64)),  # any header at all
    st.tuples(  # REQUEST [0, id, method, payload]
        st.builds(lambda sid, m, p: [0, sid, m, p], st.integers(-5, 2**40), st.sampled_from(METHODS), payloads),
        st.binary(max_size=256),
    ),
    st.tuples(  # other kinds with random fields
        st.builds(
            lambda k, sid, rest: [k, sid, *rest], st.integers(-1, 9), st.integers(-5, 64), st.lists(values, max_size=3)
        ),
        st.binary(max_size=64),
    ),
)


class _Hostile:
    """The hostile side: one event loop in a thread, one connection, reopened when the node drops it."""

    def __init__(self, target: Any):
        self.peer = HostilePeer(target, small_receive_buffer=False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stream: ByteStream | None = None
        self.reader: asyncio.Task[None] | None = None
        self.reconnects = 0

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _drain_replies(self, stream: ByteStream) -> None:
        limits = FrameLimits(max_header_bytes=8 * 2**20, max_body_bytes=64 * 2**20)
        try:
            while True:
                await read_frame(stream, limits)
        except Exception:  # the node hung up on us (or sent what our reader refuses): reconnect later
            if self.stream is stream:
                self.stream = None

    async def _send(self, header: Any, body: bytes) -> None:
        if self.stream is None or self.stream.is_closing():
            self.stream = await self.peer.handshake()
            self.reader = asyncio.ensure_future(self._drain_replies(self.stream))
            self.reconnects += 1
        try:
            await HostilePeer.send_frame(self.stream, header, body)
        except (ConnectionError, TypeError, ValueError, OverflowError):
            self.stream = None  # closed under us, or a header msgpack cannot encode: next one

    def send(self, header: Any, body: bytes) -> None:
        self.run(self._send(header, body))

    def close(self) -> None:
        async def close() -> None:
            if self.reader is not None:
                self.reader.cancel()
            await self.peer.aclose()

        self.run(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class _Tracebacks(logging.Handler):
    """Keeps every log record that carries a traceback, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[DHT, _Hostile, _Tracebacks]]:
    tracebacks = _Tracebacks()
    logging.getLogger("hivecli").addHandler(tracebacks)
    dht = DHT(start=True, wait_timeout=1.0)
    averager = DecentralizedAverager([torch.zeros(1000)], dht, prefix="fuzz", start=True)
    hostile = _Hostile(dht.get_visible_maddrs()[0])
    try:
        yield dht, hostile, tracebacks
    finally:
        hostile.close()
        averager.shutdown()
        dht.shutdown()
        logging.getLogger("hivecli").removeHandler(tracebacks)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(frame=frames)
def test_the_node_survives_thousands_of_hostile_frames(node: tuple[DHT, _Hostile, _Tracebacks], frame: Any) -> None:
    _, hostile, _ = node
    hostile.send(*frame)


def test_after_the_fuzzing_the_node_serves_honest_peers_with_bounded_memory(
    node: tuple[DHT, _Hostile, _Tracebacks],
) -> None:
    dht, hostile, tracebacks = node
    before = psutil.Process().memory_info().rss
    for i in range(300):  # more of the same kind of traffic, measured
        hostile.send([0, 2 * i, METHODS[i % len(METHODS)], {"items": [[b"x" * 20, None, b"\x01", 1e300, 0]]}], b"")
    assert (psutil.Process().memory_info().rss - before) < 200 * 2**20
    assert hostile.reconnects > 1  # the node did hang up on some of the hostile frames
    assert not tracebacks.records, f"hostile frames produced tracebacks: {tracebacks.records[:3]}"

    honest = DHT(initial_peers=[str(m) for m in dht.get_visible_maddrs()], start=True, wait_timeout=1.0)
    try:
        assert honest.store("after-fuzz", 42, get_dht_time() + 60)
        found = honest.get("after-fuzz", latest=True)
        assert found is not None and found.value == 42
    finally:
        honest.shutdown()
