"""Hosts and connections end to end: RPC, streams, errors, and peers that misbehave.

Every test runs over real TCP on 127.0.0.1 and over MemoryTransport (the `kind` fixture).
Raw clients and fake servers speak the wire format by hand through the same transport, so
the misbehaving-peer tests exercise exactly the code path a remote attacker would reach.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import struct
import types
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest

from hivecli._exceptions import (
    ConfigError,
    ConnectionClosedError,
    HandshakeError,
    HiveError,
    PeerUnreachableError,
    RemoteError,
    RPCTimeoutError,
)
from hivecli.net import (
    ByteStream,
    Connection,
    Host,
    Identity,
    MemoryTransport,
    Multiaddr,
    NetSettings,
    Reply,
    Stream,
    TCPTransport,
)
from hivecli.net.connection import EndOfStream
from hivecli.net.framing import FrameLimits, encode_frame, read_frame
from hivecli.net.handshake import PROTOCOL_VERSION, perform_handshake
from hivecli.net.transport import Listener, Transport
from hivecli.testing import wait_until

LOOPBACK = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
DEADLINE = 3.0  # how long a peer may take to react to something; far below handshake_timeout below
PATIENT = NetSettings(handshake_timeout=30.0)  # so that a close within DEADLINE is not a timeout
RAW_LIMITS = FrameLimits(max_header_bytes=2**32, max_body_bytes=2**32)


@pytest.fixture(params=["tcp", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


class Net:
    """The hosts, raw streams and fake servers of one test; `aclose` closes all of them."""

    def __init__(self, kind: str):
        self.kind = kind
        self.network = MemoryTransport.Network()
        self._hosts: list[Host] = []
        self._streams: list[ByteStream] = []
        self._listeners: list[Listener] = []
        self._fake_tasks: set[asyncio.Task[Any]] = set()

    def transport(self) -> Transport:
        return TCPTransport() if self.kind == "tcp" else MemoryTransport(self.network)

    async def host(self, settings: NetSettings | None = None, *, listen: bool = True) -> Host:
        host = Host(Identity.generate(), self.transport(), settings)
        self._hosts.append(host)
        if listen:
            await host.listen([LOOPBACK])
        return host

    async def server(self, settings: NetSettings | None = None) -> Host:
        host = await self.host(settings)
        serve(host)
        return host

    async def dial_raw(self, host: Host) -> ByteStream:
        maddr = address_of(host)
        stream = await self.transport().dial(maddr.host, maddr.port, DEADLINE)
        self._streams.append(stream)
        return stream

    async def fake_server(self, identity: Identity, handler: Callable[[ByteStream], Awaitable[None]]) -> Multiaddr:
        """Listen with a hand-written handler; returns the address to dial it at as `identity`."""

        async def wrapped(stream: ByteStream) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._fake_tasks.add(task)
            try:
                await handler(stream)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                stream.close()
                self._fake_tasks.discard(task)

        listener = await self.transport().listen("127.0.0.1", 0, wrapped)
        self._listeners.append(listener)
        host, port = listener.bound[0]
        return Multiaddr("ip4", host, port, identity.peer_id)

    async def aclose(self) -> None:
        for stream in self._streams:
            stream.close()
        for listener in self._listeners:
            await listener.aclose()
        for task in list(self._fake_tasks):
            task.cancel()
        await asyncio.gather(*self._fake_tasks, return_exceptions=True)
        for host in reversed(self._hosts):
            await host.aclose()


def run(kind: str, main: Callable[[Net], Awaitable[None]], timeout: float = 20.0) -> None:
    async def wrapper() -> None:
        net = Net(kind)
        try:
            await asyncio.wait_for(main(net), timeout)
        finally:
            await net.aclose()

    asyncio.run(wrapper())


def address_of(host: Host) -> Multiaddr:
    return host.visible_maddrs()[0]


# ---- the methods every test server offers ---------------------------------------------------


async def echo(conn: Connection, payload: Any, body: bytes) -> Reply:
    return Reply({"payload": payload, "from": conn.remote_peer.to_base58(), "len": len(body)}, body)


async def fail(conn: Connection, payload: Any, body: bytes) -> Any:
    raise ValueError(f"boom {payload}")


async def fail_config(conn: Connection, payload: Any, body: bytes) -> Any:
    raise ConfigError(f"setting {payload!r} is out of range")


async def hang(conn: Connection, payload: Any, body: bytes) -> Any:
    await asyncio.Event().wait()


async def stream_echo(stream: Stream, payload: Any, body: bytes) -> None:
    """Echo every message back, then report how many there were."""
    count = 0
    async for message in stream:
        await stream.send(message.payload, message.body)
        count += 1
    await stream.send({"count": count, "request": payload})


async def countdown(stream: Stream, payload: Any, body: bytes) -> None:
    for i in range(payload):
        await stream.send(i, str(i).encode())


async def stream_fail(stream: Stream, payload: Any, body: bytes) -> None:
    await stream.send("first")
    raise RuntimeError("stream broke halfway")


def serve(host: Host) -> None:
    host.add_unary_handler("echo", echo)
    host.add_unary_handler("fail", fail)
    host.add_unary_handler("fail_config", fail_config)
    host.add_unary_handler("hang", hang)
    host.add_stream_handler("stream_echo", stream_echo)
    host.add_stream_handler("countdown", countdown)
    host.add_stream_handler("stream_fail", stream_fail)


async def assert_serves(net: Net, server: Host) -> None:
    """A fresh, well-behaved client gets an answer from `server`."""
    client = await net.host(listen=False)
    reply = await client.call(address_of(server), "echo", {"still": "alive"}, b"ok", timeout=DEADLINE)
    assert reply.payload["payload"] == {"still": "alive"}
    assert reply.body == b"ok"


# ---- raw wire helpers -----------------------------------------------------------------------


def prefix(header_len: int, body_len: int) -> bytes:
    return struct.pack(">II", header_len, body_len)


def raw_frame(header: Any, body: bytes = b"") -> bytes:
    head, tail = encode_frame(header, body)
    return head + bytes(tail)


def hello(identity: Identity, **override: Any) -> dict[str, Any]:
    message = {
        "protocol": "hive",
        "version": PROTOCOL_VERSION,
        "peer_id": identity.peer_id.to_bytes(),
        "nonce": os.urandom(32),
        "listen": [],
    }
    message.update(override)
    return message


async def send(stream: ByteStream, data: bytes) -> None:
    stream.write(data)
    await stream.drain()


async def frames_until_closed(stream: ByteStream, deadline: float = DEADLINE) -> list[Any]:
    """Read frame headers until the other side closes; fail the test if it has not within `deadline`."""
    frames: list[Any] = []

    async def read_all() -> None:
        while True:
            try:
                header, _ = await read_frame(stream, RAW_LIMITS)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            frames.append(header)

    try:
        await asyncio.wait_for(read_all(), deadline)
    except asyncio.TimeoutError:
        pytest.fail(f"the peer did not close the connection within {deadline} s; it sent {frames!r}")
    return frames


async def authenticated_raw_client(net: Net, server: Host) -> tuple[ByteStream, Identity]:
    """A raw stream that has passed the real handshake with `server`."""
    stream = await net.dial_raw(server)
    identity = Identity.generate()
    result = await asyncio.wait_for(perform_handshake(stream, identity, [], server.peer_id, "test server"), DEADLINE)
    assert result.remote_peer == server.peer_id
    return result.stream, identity  # the sealed stream: what we write on it still reaches the frame layer


# ---- unary RPC ------------------------------------------------------------------------------

PAYLOAD = {
    "text": "ünïcødé ✓",
    "bytes": b"\x00\x01\xff",
    "int": -5,
    "big": 2**62,
    "float": 1.5,
    "none": None,
    "bool": True,
    "nested": [1, [2, {"three": 3}]],
    7: "int key",
}


def test_unary_call_round_trips_payload_and_10_mb_body(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        body = os.urandom(10 * 1024 * 1024)
        reply = await client.call(address_of(server), "echo", PAYLOAD, body, timeout=10)
        assert reply.payload["payload"] == PAYLOAD
        assert reply.payload["len"] == len(body)
        assert reply.payload["from"] == client.peer_id.to_base58()  # the server saw who we are
        assert hashlib.sha256(reply.body).digest() == hashlib.sha256(body).digest()
        assert reply.body == body

    run(kind, main)


def test_unary_call_without_body(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        reply = await client.call(address_of(server), "echo", [1, 2, 3])
        assert reply.payload["payload"] == [1, 2, 3]
        assert reply.body == b""

    run(kind, main)


def test_handler_returning_a_plain_value(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()

        async def double(conn: Connection, payload: Any, body: bytes) -> Any:
            return payload * 2

        server.add_unary_handler("double", double)
        client = await net.host(listen=False)
        reply = await client.call(address_of(server), "double", 21)
        assert reply.payload == 42
        assert reply.body == b""

    run(kind, main)


def test_connection_is_reused(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        assert conn.remote_peer == server.peer_id
        assert conn.outbound

        first = await client.call(address_of(server), "echo", 1)
        second = await client.call(server.peer_id, "echo", 2)  # by peer ID, from the address book
        assert (first.payload["payload"], second.payload["payload"]) == (1, 2)
        assert client.connection_to(server.peer_id) is conn
        assert await client.connect(server.peer_id) is conn
        assert client.open_connections() == [conn]

        inbound = server.open_connections()
        assert len(inbound) == 1
        assert inbound[0].remote_peer == client.peer_id
        assert not inbound[0].outbound

    run(kind, main)


def test_concurrent_connects_and_calls_share_one_connection(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        conns = await asyncio.gather(*(client.connect(address_of(server)) for _ in range(5)))
        assert all(c is conns[0] for c in conns)
        replies = await asyncio.gather(*(client.call(server.peer_id, "echo", i, bytes([i]) * i) for i in range(50)))
        for i, reply in enumerate(replies):
            assert reply.payload["payload"] == i
            assert reply.body == bytes([i]) * i
        assert len(server.open_connections()) == 1

    run(kind, main)


def test_two_peers_that_dial_each_other_choose_the_same_connection(kind: str) -> None:
    """Both ends open new streams on the one dialed by the smaller peer ID (else each side's
    streams took its own, and a round paced per connection sent twice its share to that peer);
    when it closes, the other connection takes over on both sides, without a new dial."""

    async def main(net: Net) -> None:
        a, b = sorted([await net.server(), await net.server()], key=lambda host: host.peer_id, reverse=True)
        await a.connect(address_of(b))  # the larger ID dials first: the first connection is not the one to keep
        await b._dial(a.peer_id, [address_of(a)])  # what a simultaneous dial leaves: two connections
        assert len(a.open_connections()) == len(b.open_connections()) == 2
        chosen_a, chosen_b = a.connection_to(b.peer_id), b.connection_to(a.peer_id)
        assert chosen_a is not None and chosen_b is not None
        assert chosen_a.outbound == (a.peer_id < b.peer_id)
        assert chosen_b.outbound == (b.peer_id < a.peer_id)  # the same TCP connection, seen from b

        chosen_a.close("test: the chosen one goes")
        await wait_until(lambda: a.connection_to(b.peer_id) not in (None, chosen_a), DEADLINE)
        await wait_until(lambda: b.connection_to(a.peer_id) not in (None, chosen_b), DEADLINE)
        reply = await b.call(a.peer_id, "echo", "still there")
        assert reply.payload["payload"] == "still there"
        assert len(a.open_connections()) == len(b.open_connections()) == 1

    run(kind, main)


def test_a_dial_that_loses_the_choice_returns_the_pairs_connection(kind: str) -> None:
    """The caller of a dial that lost to the peer's own (it dialed us first, and has the smaller
    ID) gets the connection both sides use, not the one it dialed."""

    async def main(net: Net) -> None:
        smaller, larger = sorted([await net.server(), await net.server()], key=lambda host: host.peer_id)
        await smaller.connect(address_of(larger))
        dialed = await larger._dial(smaller.peer_id, [address_of(smaller)])
        assert dialed is larger.connection_to(smaller.peer_id) and not dialed.outbound

    run(kind, main)


class _StandIn(types.SimpleNamespace):
    __hash__ = object.__hash__  # a connection is hashed by identity


def test_the_choice_ranks_a_direct_link_first_then_the_smaller_ids_dial_then_the_first_registered() -> None:
    """Host._choose's order, on stand-in connections (no sockets, no loop)."""
    me, other = sorted([Identity.generate().peer_id, Identity.generate().peer_id])
    host = Host.__new__(Host)
    host.peer_id = me
    host._connections, host._all_connections = {}, {}

    def choose(*specs: tuple[bool, bool]) -> int:
        """Register connections (relayed, dialed by us) in this order; the index of the chosen one."""
        conns = [_StandIn(relayed=r, outbound=o, remote_peer=other, is_closed=False) for r, o in specs]
        host._all_connections = dict.fromkeys(conns)
        host._choose(other)
        return conns.index(host._connections[other])

    assert choose((True, True), (False, False)) == 1  # direct, though the larger ID dialed it
    assert choose((False, False), (False, True)) == 1  # we have the smaller ID: ours
    assert choose((False, True), (False, True)) == 0  # both ours: the first registered
    assert choose((False, False), (True, True)) == 0


def test_handler_exception_becomes_remote_error(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        with pytest.raises(RemoteError) as info:
            await client.call(address_of(server), "fail", 42)
        message = str(info.value)
        assert "boom 42" in message
        assert "ValueError" in message
        assert "fail" in message
        assert str(server.peer_id) in message

        with pytest.raises(RemoteError, match="setting 'speed' is out of range"):
            await client.call(server.peer_id, "fail_config", "speed")

        # the connection survives a failing handler
        assert (await client.call(server.peer_id, "echo", "after")).payload["payload"] == "after"
        assert len(server.open_connections()) == 1

    run(kind, main)


def test_unknown_method_is_a_remote_error(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        with pytest.raises(RemoteError, match="unknown method 'no_such_method'"):
            await client.call(address_of(server), "no_such_method", None)
        conn = client.connection_to(server.peer_id)
        assert conn is not None
        stream = await conn.open_stream("no_such_stream", None)
        with pytest.raises(RemoteError, match="unknown method 'no_such_stream'"):
            await stream.recv(timeout=DEADLINE)
        assert (await client.call(server.peer_id, "echo", "ok")).payload["payload"] == "ok"

    run(kind, main)


def test_call_timeout_cancels_the_remote_handler(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        started, cancelled, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def slow(conn: Connection, payload: Any, body: bytes) -> Any:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            finally:
                finished.set()

        server.add_unary_handler("slow", slow)
        client = await net.host(listen=False)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(RPCTimeoutError) as info:
            await client.call(address_of(server), "slow", None, timeout=0.3)
        assert 0.25 <= loop.time() - t0 < DEADLINE
        assert isinstance(info.value, TimeoutError)
        assert "slow" in str(info.value)
        assert started.is_set()
        await asyncio.wait_for(cancelled.wait(), DEADLINE)
        await asyncio.wait_for(finished.wait(), DEADLINE)
        # the connection is still usable, and it is still the only one
        assert (await client.call(server.peer_id, "echo", "next")).payload["payload"] == "next"
        assert len(server.open_connections()) == 1

    run(kind, main)


# ---- streams --------------------------------------------------------------------------------


def test_stream_echo_both_ways(kind: str) -> None:
    n = 200  # more than stream_queue_size, so flow control is exercised

    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        stream = await conn.open_stream("stream_echo", {"hello": "stream"})
        for i in range(n):
            await stream.send({"i": i}, f"body {i}".encode())
        await stream.end()
        received = [message async for message in stream]
        assert len(received) == n + 1
        for i, message in enumerate(received[:n]):
            assert message.payload == {"i": i}
            assert message.body == f"body {i}".encode()
        assert received[-1].payload == {"count": n, "request": {"hello": "stream"}}
        with pytest.raises(EndOfStream):
            await stream.recv(timeout=DEADLINE)

    run(kind, main)


def test_stream_send_and_receive_concurrently(kind: str) -> None:
    n = 100

    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        stream = await conn.open_stream("stream_echo", None)

        async def sender() -> None:
            for i in range(n):
                await stream.send(i, os.urandom(1000))
            await stream.end()

        send_task = asyncio.ensure_future(sender())
        payloads = [message.payload async for message in stream]
        await send_task
        assert payloads == [*range(n), {"count": n, "request": None}]

    run(kind, main)


def test_server_streams_to_client(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        stream = await conn.open_stream("countdown", 10)
        await stream.end()
        messages = [await stream.recv(timeout=DEADLINE) for _ in range(10)]
        assert [(m.payload, m.body) for m in messages] == [(i, str(i).encode()) for i in range(10)]
        with pytest.raises(EndOfStream):
            await stream.recv(timeout=DEADLINE)

    run(kind, main)


def test_stream_handler_error_reaches_the_caller(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        stream = await conn.open_stream("stream_fail", None)
        assert (await stream.recv(timeout=DEADLINE)).payload == "first"
        with pytest.raises(RemoteError, match="stream broke halfway"):
            await stream.recv(timeout=DEADLINE)

    run(kind, main)


def test_stream_cancel_cancels_the_remote_handler(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        got_first, finished = asyncio.Event(), asyncio.Event()

        async def listener(stream: Stream, payload: Any, body: bytes) -> None:
            try:
                async for _ in stream:
                    got_first.set()
            finally:
                finished.set()

        server.add_stream_handler("listener", listener)
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        stream = await conn.open_stream("listener", None)
        await stream.send("one")
        await asyncio.wait_for(got_first.wait(), DEADLINE)
        assert not finished.is_set()
        await stream.cancel()
        await asyncio.wait_for(finished.wait(), DEADLINE)
        assert (await client.call(server.peer_id, "echo", "ok")).payload["payload"] == "ok"

    run(kind, main)


def test_a_sink_setup_lands_data_sent_right_behind_a_request_in_its_buffer(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The read loop reads on before a stream handler's task runs: the data a peer sends
    right behind its request reaches a sink only if one was set before the task (Handlers.sinks)."""

    async def main(net: Net) -> None:
        server = await net.server()
        buffers: dict[int, bytearray] = {}

        def setup(stream: Stream, payload: Any) -> None:
            if payload == "broken":
                raise RuntimeError("a bug in the setup")
            buffer = buffers[stream.stream_id] = bytearray(4096)
            stream.body_sink = lambda chunk, nbytes: memoryview(buffer)[:nbytes] if chunk == "chunk" else None

        async def handler(stream: Stream, payload: Any, body: bytes) -> None:
            message = await stream.recv(timeout=DEADLINE)
            landed = isinstance(message.body, memoryview) and message.body.obj is buffers.get(stream.stream_id)
            await stream.send({"landed": landed, "first": bytes(message.body[:4])})

        server.add_stream_handler("sunk", handler, setup)
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        for request, data, landed in (("ok", b"\x01\x02\x03\x04" * 1000, True), ("broken", b"abcd" * 10, False)):
            stream = await conn.open_stream("sunk", request)
            await stream.send("chunk", data)  # right behind the request: the handler has not run yet
            reply = await stream.recv(timeout=DEADLINE)
            assert reply.payload == {"landed": landed, "first": data[:4]}
        assert len([r for r in caplog.records if "Sink setup of sunk failed" in r.getMessage()]) == 1
        server.remove_stream_handler("sunk")
        assert "sunk" not in server.handlers.streaming and "sunk" not in server.handlers.sinks

    run(kind, main)


async def ask_and_answer_last(stream: Stream, payload: Any, body: bytes) -> None:
    """Answers a stream's one message with its last message, then returns."""
    question = await stream.recv(timeout=DEADLINE)
    await stream.send_last({"answer": question.payload}, question.body[::-1])


def test_a_last_message_ends_the_stream_on_both_sides(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        server.add_stream_handler("ask", ask_and_answer_last)
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        stream = await conn.open_stream("ask", None)
        await stream.send_last("why", b"abc")
        with pytest.raises(HiveError, match="already ended"):
            await stream.send("more")
        with pytest.raises(HiveError, match="already ended"):
            await stream.send_last("more")
        reply = await stream.recv(timeout=DEADLINE)
        assert (reply.payload, reply.body) == ({"answer": "why"}, b"cba")
        with pytest.raises(EndOfStream):
            await stream.recv(timeout=DEADLINE)
        served = server.connection_to(client.peer_id)
        assert served is not None
        await wait_until(lambda: not served._streams and not served._handler_tasks, DEADLINE, "the served stream to go")
        assert not conn._streams  # both sides ended: nothing to cancel, nothing left

    run(kind, main)


def test_a_last_message_is_one_frame(kind: str) -> None:
    """send_last costs one RESPONSE frame: no END follows it, from either side."""

    async def main(net: Net) -> None:
        server = await net.server(PATIENT)
        server.add_stream_handler("ask", ask_and_answer_last)
        raw, _ = await authenticated_raw_client(net, server)
        await send(raw, raw_frame([0, 0, "ask", None]) + raw_frame([5, 0, "why"]))  # the question, and our end
        header, _ = await asyncio.wait_for(read_frame(raw, RAW_LIMITS), DEADLINE)
        assert header == [5, 0, {"answer": "why"}]
        await send(raw, raw_frame([0, 2, "echo", "after"]))
        header, _ = await asyncio.wait_for(read_frame(raw, RAW_LIMITS), DEADLINE)
        assert header[:2] == [5, 2]  # the next frame answers the next call: no END for stream 0 came

    run(kind, main)


def test_a_stream_cancelled_before_its_handler_starts_is_forgotten_with_its_sink(kind: str) -> None:
    """A CANCEL read right behind its REQUEST cancels the handler's task before its first step,
    so the task's own cleanup never runs: the stream, and the body sink its setup gave it, must
    still go, or the peer could write through that sink for the connection's life."""

    async def main(net: Net) -> None:
        server = await net.server(PATIENT)
        buffer, started, prepared = bytearray(64), [], []

        def setup(stream: Stream, payload: Any) -> None:
            prepared.append(stream.stream_id)
            stream.body_sink = lambda chunk, nbytes: memoryview(buffer)[:nbytes]

        async def handler(stream: Stream, payload: Any, body: bytes) -> None:
            started.append(stream.stream_id)

        server.add_stream_handler("sunk", handler, setup)
        raw, me = await authenticated_raw_client(net, server)
        await send(raw, raw_frame([0, 0, "sunk", None]) + raw_frame([4, 0]))  # one write: one read there
        await wait_until(lambda: server.connection_to(me.peer_id) is not None, DEADLINE, "the connection")
        conn = server.connection_to(me.peer_id)
        assert conn is not None
        await wait_until(
            lambda: prepared == [0] and 0 not in conn._streams and not conn._handler_tasks, DEADLINE, "the stream to go"
        )
        await send(raw, raw_frame([1, 0, "chunk"], b"\xff" * 64))  # for the cancelled stream: dropped
        await send(raw, raw_frame([0, 2, "echo", "after"]))
        header, _ = await asyncio.wait_for(read_frame(raw, RAW_LIMITS), DEADLINE)
        assert header[:2] == [5, 2] and header[2]["payload"] == "after"  # served after the dropped data
        assert buffer == bytearray(64) and started == []

    run(kind, main)


def test_closing_the_server_fails_open_streams_and_later_calls(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server()
        client = await net.host(listen=False)
        conn = await client.connect(address_of(server))
        stream = await conn.open_stream("stream_echo", None)
        await server.aclose()
        with pytest.raises(ConnectionClosedError):
            await stream.recv(timeout=DEADLINE)
        await asyncio.wait_for(conn.closed.wait(), DEADLINE)
        assert client.connection_to(server.peer_id) is None
        with pytest.raises(PeerUnreachableError):
            await client.call(server.peer_id, "echo", None)

    run(kind, main)


# ---- addressing and dialing errors ----------------------------------------------------------


def test_dialing_a_closed_port_is_peer_unreachable(kind: str) -> None:
    async def main(net: Net) -> None:
        gone = await net.host()
        maddr = address_of(gone)
        await gone.aclose()
        client = await net.host(listen=False)
        with pytest.raises(PeerUnreachableError) as info:
            await client.connect(maddr)
        message = str(info.value)
        assert f"127.0.0.1:{maddr.port}" in message
        assert str(gone.peer_id) in message
        assert "refused" in message.lower()
        assert client.connection_to(gone.peer_id) is None

    run(kind, main)


def test_calling_a_peer_with_no_known_address(kind: str) -> None:
    async def main(net: Net) -> None:
        client = await net.host(listen=False)
        stranger = Identity.generate().peer_id
        with pytest.raises(PeerUnreachableError, match=f"no known address for peer {stranger}"):
            await client.call(stranger, "echo", None)

    run(kind, main)


def test_connect_rejects_own_address_and_addresses_without_peer_id(kind: str) -> None:
    async def main(net: Net) -> None:
        host = await net.host()
        with pytest.raises(ConfigError, match="own address"):
            await host.connect(address_of(host))
        with pytest.raises(ConfigError, match="no /p2p/PEER_ID"):
            await host.connect(address_of(host).without_peer_id())
        with pytest.raises(ConfigError, match="must not contain /p2p"):
            await host.listen([address_of(host)])

    run(kind, main)


def test_listening_on_a_port_in_use_is_a_config_error(kind: str) -> None:
    async def main(net: Net) -> None:
        first = await net.host()
        second = await net.host(listen=False)
        taken = address_of(first).without_peer_id()
        with pytest.raises(ConfigError, match=f"cannot listen on {taken}"):
            await second.listen([taken])

    run(kind, main)


def test_address_with_someone_elses_peer_id_is_rejected(kind: str) -> None:
    async def main(net: Net) -> None:
        a = await net.server()
        b = await net.server()
        client = await net.host(listen=False)
        spoofed = address_of(a).with_peer_id(b.peer_id)  # A's host:port, B's identity
        with pytest.raises((HandshakeError, PeerUnreachableError)) as info:
            await client.connect(spoofed)
        message = str(info.value)
        assert str(a.peer_id) in message
        assert str(b.peer_id) in message
        assert client.connection_to(b.peer_id) is None
        assert spoofed not in client.address_book.get(b.peer_id, [])  # the bad address is not learned
        # A keeps serving, B is reachable at its real address
        assert (await client.call(address_of(a), "echo", "a")).payload["payload"] == "a"
        assert (await client.call(address_of(b), "echo", "b")).payload["payload"] == "b"
        await assert_serves(net, a)

    run(kind, main)


def test_dialer_rejects_a_server_speaking_another_protocol_version(kind: str) -> None:
    async def main(net: Net) -> None:
        fake = Identity.generate()

        async def future_version(stream: ByteStream) -> None:
            await send(stream, raw_frame(hello(fake, version=PROTOCOL_VERSION + 1)))
            await frames_until_closed(stream)

        maddr = await net.fake_server(fake, future_version)
        client = await net.host(listen=False, settings=PATIENT)
        with pytest.raises((HandshakeError, PeerUnreachableError)) as info:
            await client.connect(maddr)
        message = str(info.value)
        assert f"v{PROTOCOL_VERSION + 1}" in message
        assert f"v{PROTOCOL_VERSION}" in message
        assert client.connection_to(fake.peer_id) is None

    run(kind, main)


def test_dialer_gives_up_on_a_silent_server(kind: str) -> None:
    async def main(net: Net) -> None:
        fake = Identity.generate()

        async def silent(stream: ByteStream) -> None:
            await frames_until_closed(stream, deadline=10)

        maddr = await net.fake_server(fake, silent)
        client = await net.host(listen=False, settings=NetSettings(handshake_timeout=0.3))
        with pytest.raises(PeerUnreachableError, match=re.escape("did not complete the handshake within 0.3 s")):
            await client.connect(maddr)

    run(kind, main)


def test_dialer_rejects_a_server_with_malformed_hello_fields(kind: str) -> None:
    """A hostile server's HELLO with wrongly typed fields must fail the dial the documented way."""

    async def main(net: Net) -> None:
        fake = Identity.generate()

        async def bad_hello(stream: ByteStream) -> None:
            await send(stream, raw_frame(hello(fake, listen=5)))
            await frames_until_closed(stream)

        maddr = await net.fake_server(fake, bad_hello)
        client = await net.host(listen=False, settings=PATIENT)
        with pytest.raises((HandshakeError, PeerUnreachableError)):
            await client.connect(maddr)

    run(kind, main)


def test_goaway_reason_reaches_the_caller(kind: str) -> None:
    """The reason a peer gives in GOAWAY is what the caller's ConnectionClosedError reports."""

    async def main(net: Net) -> None:
        fake = Identity.generate()

        async def hang_up(raw: ByteStream) -> None:
            stream = (await perform_handshake(raw, fake, [], None, "client")).stream
            request, _ = await read_frame(stream, RAW_LIMITS)
            assert request[0] == 0 and request[2] == "echo"
            await send(stream, raw_frame([6, 0, "node is shutting down for maintenance"]))
            await frames_until_closed(stream)

        maddr = await net.fake_server(fake, hang_up)
        client = await net.host(listen=False)
        with pytest.raises(ConnectionClosedError) as info:
            await client.call(maddr, "echo", None, timeout=DEADLINE)
        assert "node is shutting down for maintenance" in str(info.value)

    run(kind, main)


# ---- misbehaving clients: before the handshake ----------------------------------------------


def bad_handshakes() -> dict[str, Callable[[Identity], bytes]]:
    return {
        "header-100MB": lambda me: prefix(100 * 1024 * 1024, 0),
        "header-4GB": lambda me: prefix(2**32 - 1, 0),
        "handshake-with-body": lambda me: prefix(20, 1),
        "http-request": lambda me: b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "tls-client-hello": lambda me: bytes.fromhex("1603010200010001fc0303"),
        "malformed-msgpack": lambda me: prefix(1, 0) + b"\xc1",
        "ext-type": lambda me: raw_frame({"protocol": msgpack.ExtType(3, b"hive")}),
        "not-a-map": lambda me: raw_frame(["hive", 1]),
        "wrong-protocol": lambda me: raw_frame(hello(me, protocol="libp2p")),
        "no-nonce": lambda me: raw_frame({k: v for k, v in hello(me).items() if k != "nonce"}),
        "short-nonce": lambda me: raw_frame(hello(me, nonce=b"\x01" * 16)),
        "bad-peer-id": lambda me: raw_frame(hello(me, peer_id=b"\x00\x24" + b"\x00" * 36)),
        "peer-id-not-bytes": lambda me: raw_frame(hello(me, peer_id=12345)),
    }


@pytest.mark.parametrize("name", bad_handshakes().keys())
def test_bad_handshake_is_disconnected_and_server_keeps_serving(kind: str, name: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server(PATIENT)
        me = Identity.generate()
        stream = await net.dial_raw(server)
        await send(stream, bad_handshakes()[name](me))
        frames = await frames_until_closed(stream)
        # at most the server's own HELLO came back; never an AUTH
        assert len(frames) <= 1
        assert all(isinstance(f, dict) and "signature" not in f for f in frames)
        assert server.open_connections() == []
        await assert_serves(net, server)

    run(kind, main)


@pytest.mark.parametrize(
    "override",
    [{"listen": 5}, {"peer_id": list(range(38))}],
    ids=["listen-int", "peer-id-list"],
)
def test_wrongly_typed_hello_fields_are_rejected_cleanly(
    kind: str, override: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Type confusion in a HELLO must be a handshake rejection, not an unhandled exception."""

    async def main(net: Net) -> None:
        server = await net.server(PATIENT)
        stream = await net.dial_raw(server)
        await send(stream, raw_frame(hello(Identity.generate(), **override)))
        frames = await frames_until_closed(stream)
        assert all("signature" not in f for f in frames)
        assert server.open_connections() == []
        await assert_serves(net, server)

    with caplog.at_level(logging.WARNING):
        run(kind, main)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_raw_client_speaking_another_protocol_version_is_refused(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server(PATIENT)
        me = Identity.generate()
        stream = await net.dial_raw(server)
        server_hello, _ = await asyncio.wait_for(read_frame(stream, RAW_LIMITS), DEADLINE)
        assert server_hello["protocol"] == "hive"
        assert server_hello["version"] == PROTOCOL_VERSION
        assert server_hello["peer_id"] == server.peer_id.to_bytes()
        await send(stream, raw_frame(hello(me, version=PROTOCOL_VERSION + 1)))
        assert await frames_until_closed(stream) == []  # no AUTH: closed right after our HELLO
        assert server.open_connections() == []
        await assert_serves(net, server)

    run(kind, main)


def test_impostor_without_the_key_is_refused(kind: str) -> None:
    """A client that claims someone else's peer ID but signs with its own key is refused."""

    async def main(net: Net) -> None:
        server = await net.server(PATIENT)
        victim, mallory = Identity.generate(), Identity.generate()
        impostor = Identity(mallory._private_key)  # signs with mallory's key ...
        impostor.peer_id = victim.peer_id  # ... while its HELLO claims the victim's peer ID
        stream = await net.dial_raw(server)
        try:  # our side may finish (the server's proof is fine) before the server checks ours
            result = await asyncio.wait_for(perform_handshake(stream, impostor, [], server.peer_id, "x"), DEADLINE)
        except (HandshakeError, asyncio.IncompleteReadError, ConnectionError):
            pass
        else:
            assert await frames_until_closed(result.stream) == []  # ... and then it hangs up on us
        assert server.connection_to(victim.peer_id) is None
        assert server.open_connections() == []
        await assert_serves(net, server)

    run(kind, main)


def test_client_that_never_finishes_the_handshake_is_dropped(kind: str) -> None:
    async def main(net: Net) -> None:
        server = await net.server(NetSettings(handshake_timeout=0.3))
        stream = await net.dial_raw(server)
        await send(stream, prefix(100, 0) + b"\x00" * 10)  # a frame that never completes
        frames = await frames_until_closed(stream)
        assert len(frames) <= 1  # the server's HELLO at most
        await assert_serves(net, server)

    run(kind, main)


# ---- misbehaving clients: after a successful handshake --------------------------------------


def test_raw_authenticated_client_can_call(kind: str) -> None:
    """The positive control for the tests below: a hand-driven client that behaves gets answers."""

    async def main(net: Net) -> None:
        server = await net.server(PATIENT)
        stream, me = await authenticated_raw_client(net, server)
        for stream_id in (0, 2):
            await send(stream, raw_frame([0, stream_id, "echo", {"n": stream_id}], b"raw body"))
            header, body = await asyncio.wait_for(read_frame(stream, RAW_LIMITS), DEADLINE)
            assert header == [5, stream_id, {"payload": {"n": stream_id}, "from": str(me.peer_id), "len": 8}]
            assert body == b"raw body"
        conn = server.connection_to(me.peer_id)
        assert conn is not None and not conn.is_closed

    run(kind, main)


BAD_FRAMES: dict[str, tuple[bytes, str]] = {
    # name: (bytes sent after the handshake -- exactly what the server reads --, GOAWAY reason)
    "header-100MB": (prefix(100 * 1024 * 1024, 0), "frame header of 104857600 bytes exceeds the limit"),
    "header-4GB": (prefix(2**32 - 1, 0), "frame header of 4294967295 bytes exceeds the limit"),
    "body-100MB": (prefix(16, 100 * 1024 * 1024), "frame body of 104857600 bytes exceeds the limit"),
    "malformed-msgpack": (prefix(1, 0) + b"\xc1", "undecodable msgpack"),
    "truncated-msgpack": (prefix(3, 0) + b"\x94\x00\x00", "undecodable msgpack"),
    "ext-type": (raw_frame([0, 0, "echo", msgpack.ExtType(1, b"x")]), "extension type 1 is not allowed"),
    "not-a-list": (raw_frame({"kind": 0, "id": 0}), "is not [kind, stream_id, ...]"),
    "stream-id-not-int": (raw_frame([1, "zero", None]), "is not [kind, stream_id, ...]"),
    "unknown-kind": (raw_frame([99, 0]), "unknown frame kind 99"),
    "short-request": (raw_frame([0, 0, "echo"]), "REQUEST frame must be [0, stream_id, method, payload]"),
    "method-not-str": (raw_frame([0, 0, 7, None]), "REQUEST frame must be"),
    "short-data": (raw_frame([1, 0]), "DATA frame must have 3 fields"),
    "reused-stream-id": (
        raw_frame([0, 0, "hang", None]) + raw_frame([0, 0, "hang", None]),
        "REQUEST reuses open stream id 0",
    ),
}


@pytest.mark.parametrize("name", BAD_FRAMES.keys())
def test_bad_frame_after_handshake_gets_goaway_and_disconnect(kind: str, name: str) -> None:
    data, reason = BAD_FRAMES[name]

    async def main(net: Net) -> None:
        server = await net.server(PATIENT)
        stream, me = await authenticated_raw_client(net, server)
        await send(stream, data)
        frames = await frames_until_closed(stream)
        assert len(frames) == 1, frames
        kind_, stream_id, message = frames[0]
        assert (kind_, stream_id) == (6, 0)  # GOAWAY
        assert reason in message
        assert server.connection_to(me.peer_id) is None
        assert all(c.remote_peer != me.peer_id for c in server.open_connections())
        await assert_serves(net, server)

    run(kind, main)


def test_oversized_frame_from_a_host_client_is_refused_and_the_next_call_reconnects(kind: str) -> None:
    """Limits are the receiver's: a normal Host sending over the server's limit is disconnected."""

    async def main(net: Net) -> None:
        limits = FrameLimits(max_header_bytes=4096, max_body_bytes=1024)
        server = await net.server(NetSettings(limits=limits))
        client = await net.host(listen=False)
        first = await client.connect(address_of(server))
        with pytest.raises(ConnectionClosedError):
            await client.call(server.peer_id, "echo", None, b"x" * 1025, timeout=DEADLINE)
        await asyncio.wait_for(first.closed.wait(), DEADLINE)
        reply = await client.call(server.peer_id, "echo", None, b"x" * 1024, timeout=DEADLINE)
        assert reply.body == b"x" * 1024
        assert client.connection_to(server.peer_id) is not first

    run(kind, main)


def test_connect_does_not_hang_when_the_host_closes_before_the_dial_starts():
    async def main():
        listen = [Multiaddr.parse("/ip4/127.0.0.1/tcp/0")]
        a, b = Host(), Host()
        await a.listen(listen)
        await b.listen(listen)
        try:
            pending = asyncio.ensure_future(a.connect(b.visible_maddrs()[0]))
            await asyncio.sleep(0)  # the dial task exists but has not run yet
            await a.aclose()
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(pending, 5)
            assert not a._dials
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


# ---- send order: control messages ahead of tensor chunks ------------------------------------


def test_a_control_message_overtakes_chunks_that_wait_to_be_sent() -> None:
    """Sixteen 4 MiB chunks are queued on one stream of a connection whose reader is stalled; a
    request without a body on another stream must go out behind at most what the kernel's
    buffers, the reader and one chunk hold, not behind all sixteen (each sender writing its
    chunk and then waiting, as before, queued them all ahead of it)."""
    chunk, count = 4 * 1024 * 1024, 16

    async def main(net: Net) -> None:
        seen: list[Any] = []
        go = asyncio.Event()

        async def slow_sink(stream: Stream, payload: Any, body: bytes) -> None:
            await go.wait()
            async for message in stream:
                seen.append(message.payload)

        async def control(stream: Stream, payload: Any, body: bytes) -> None:
            seen.append("control")

        server = await net.server(NetSettings(stream_queue_size=1))  # its read loop stalls at once
        server.add_stream_handler("sink", slow_sink)
        server.add_stream_handler("control", control)
        client = await net.host()
        conn = await client.connect(address_of(server))
        stream = await conn.open_stream("sink", None)
        body = bytes(chunk)
        sends = [asyncio.create_task(stream.send(i, body)) for i in range(count)]
        full = "the chunks to fill the kernel's buffers"  # from then on, the rest wait here
        await wait_until(lambda: conn._stream.write_buffer_size() > 0, DEADLINE, full)
        await conn.open_stream("control", None)  # returns once its REQUEST frame is queued
        go.set()
        await asyncio.wait_for(asyncio.gather(*sends), DEADLINE)
        await stream.end()
        await wait_until(lambda: len(seen) == count + 1, DEADLINE, "every chunk and the control message to arrive")
        ahead = seen.index("control")
        assert ahead <= count // 2, f"the control message arrived after {ahead} of {count} chunks"

    run("tcp", main)
