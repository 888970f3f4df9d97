"""Hostile peers against a Host's limits: each attack goes through the wire as a stranger would
send it, is refused or bounded, logs at most one line per kind and no traceback, and an honest
peer still gets an answer afterwards.

Everything runs over real TCP on 127.0.0.1, port 0, with limits scaled down so each test takes
a few seconds; waits are on conditions with deadlines (`wait_until`), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hivecli._exceptions import HandshakeError, MalformedFrameError, RemoteError
from hivecli.net import ByteStream, Connection, Host, Identity, Multiaddr, NetSettings, Reply
from hivecli.net.connection import LimitLog
from hivecli.net.framing import FrameLimits, describe, read_frame, unpack
from hivecli.net.host import default_max_connections
from hivecli.net.tcp import _INITIAL_BUFFER_BYTES, _TCPStream
from hivecli.testing import HostilePeer, wait_until

LOOPBACK = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
DEADLINE = 5.0
RAW_LIMITS = FrameLimits(max_header_bytes=2**32, max_body_bytes=2**32)
FIND_REPLY = b"n" * 8192  # what a dht.find-like inline handler answers with


async def echo(conn: Connection, payload: Any, body: bytes) -> Reply:
    return Reply({"payload": payload}, body)


async def hang(conn: Connection, payload: Any, body: bytes) -> Any:
    await asyncio.Event().wait()


def find(conn: Connection, payload: Any, body: bytes) -> Reply:
    return Reply({"peers": []}, FIND_REPLY)


class Scene:
    """One server, the honest clients and hostile peers of a test; `aclose` closes them all."""

    def __init__(self) -> None:
        self.hosts: list[Host] = []
        self.hostile: list[HostilePeer] = []

    async def server(self, **settings: Any) -> Host:
        host = Host(Identity.generate(), settings=NetSettings(**settings))
        host.add_unary_handler("echo", echo)
        host.add_unary_handler("hang", hang)
        host.add_inline_handler("find", find)
        self.hosts.append(host)
        await host.listen([LOOPBACK])
        return host

    def attacker(self, server: Host) -> HostilePeer:
        peer = HostilePeer(server.visible_maddrs()[0])
        self.hostile.append(peer)
        return peer

    async def assert_serves(self, server: Host) -> None:
        """A fresh, well-behaved client connects and gets an answer."""
        client = Host(Identity.generate())
        self.hosts.append(client)
        reply = await client.call(server.visible_maddrs()[0], "echo", {"still": "alive"}, b"ok", timeout=DEADLINE)
        assert reply.payload == {"payload": {"still": "alive"}} and reply.body == b"ok"

    async def aclose(self) -> None:
        for peer in self.hostile:
            await peer.aclose()
        for host in reversed(self.hosts):
            await host.aclose()


def run(main: Callable[[Scene], Awaitable[None]], timeout: float = 30.0) -> None:
    async def wrapper() -> None:
        scene = Scene()
        try:
            await asyncio.wait_for(main(scene), timeout)
        finally:
            await scene.aclose()

    asyncio.run(wrapper())


def tcp_of(stream: ByteStream) -> _TCPStream:
    """The TCP stream under a (possibly sealed) connection stream."""
    inner = getattr(stream, "_inner", stream)
    assert isinstance(inner, _TCPStream)
    return inner


def connections_of(server: Host, peer_ids: set[Any]) -> list[Connection]:
    return [c for c in server.open_connections() if c.remote_peer in peer_ids]


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR or "Recursion" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


def lines_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ---- 1. connections that never finish the handshake -----------------------------------------


def test_unfinished_handshakes_are_capped_and_cost_little_memory(caplog: pytest.LogCaptureFixture) -> None:
    async def main(scene: Scene) -> None:
        server = await scene.server(max_pending_handshakes=16, handshake_timeout=30.0)
        hostile = scene.attacker(server)
        raw = await hostile.open_raw(40)
        await wait_until(lambda: server._pending_handshakes == 16, DEADLINE, "16 pending handshakes")
        await wait_until(
            lambda: sum(tcp_of(s)._eof for s in raw) == 24, DEADLINE, "the 24 over the cap to be closed at once"
        )
        assert server._pending_handshakes == 16
        # each stalled stranger costs the server one small buffer
        accepted = [o for o in gc.get_objects() if type(o) is _TCPStream and o._on_ready and not o._lost]
        assert len(accepted) == 16
        assert all(len(s._buffer) <= _INITIAL_BUFFER_BYTES for s in accepted)
        assert len(lines_with(caplog, "max_pending_handshakes=16")) == 1  # one line, rate-limited
        await hostile.aclose()
        await wait_until(lambda: server._pending_handshakes == 0, DEADLINE, "the handshakes to be abandoned")
        await wait_until(lambda: all(s._lost for s in accepted), DEADLINE, "the server to close them")
        assert all(len(s._buffer) == 0 for s in accepted)  # released with the connection
        await scene.assert_serves(server)
        no_tracebacks(caplog)

    with caplog.at_level(logging.DEBUG, logger="hivecli.net"):
        run(main)


def test_receive_buffer_grows_only_as_bytes_arrive_and_shrinks_when_read() -> None:
    """A read of 8 MiB holds memory for the bytes that arrived, not for the 8 MiB it asks for:
    about one buffer before the first byte, a few times 100 kB after 100 kB (tracemalloc counts
    every buffer: the stream's, and the pieces a large read receives into)."""

    async def main() -> None:
        received: list[bytes] = []
        server_streams: list[_TCPStream] = []

        async def handler(stream: ByteStream) -> None:
            assert isinstance(stream, _TCPStream)
            server_streams.append(stream)
            received.append(await stream.read_exactly(8 * 1024 * 1024))

        from hivecli.net.tcp import TCPTransport

        first, rest = b"x" * 100_000, b"y" * (8 * 1024 * 1024 - 100_000)
        listener = await TCPTransport().listen("127.0.0.1", 0, handler)
        host, port = listener.bound[0]
        tracemalloc.start()
        client = None
        try:
            before = tracemalloc.get_traced_memory()[0]
            client = await TCPTransport().dial(host, port, DEADLINE)

            def held() -> int:
                return tracemalloc.get_traced_memory()[0] - before

            def waiting() -> bool:  # the server's read waits for bytes
                return bool(server_streams) and server_streams[0]._waiter is not None

            await wait_until(waiting, DEADLINE, "the server's read to wait")
            # both ends' buffers and the first piece, 16 KiB each, and the connection's objects
            assert held() <= 4 * _INITIAL_BUFFER_BYTES + 64 * 1024
            client.write(first)
            await client.drain()

            await wait_until(lambda: server_streams[0].bytes_received >= 100_000, DEADLINE, "100 kB")
            assert held() <= 4 * 100_000 + 64 * 1024  # not the 8 MiB it was asked for
            client.write(rest)
            await client.drain()
            await wait_until(lambda: received, DEADLINE, "the whole read")
            assert received[0] == first + rest
            assert len(server_streams[0]._buffer) == _INITIAL_BUFFER_BYTES  # given back once read
        finally:
            tracemalloc.stop()
            if client is not None:
                client.close()
            await listener.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_large_read_cut_short_reports_every_byte_that_arrived() -> None:
    async def main() -> None:
        errors: list[asyncio.IncompleteReadError] = []

        async def handler(stream: ByteStream) -> None:
            try:
                await stream.read_exactly(8 * 1024 * 1024)
            except asyncio.IncompleteReadError as e:
                errors.append(e)

        from hivecli.net.tcp import TCPTransport

        listener = await TCPTransport().listen("127.0.0.1", 0, handler)
        host, port = listener.bound[0]
        client = await TCPTransport().dial(host, port, DEADLINE)
        try:
            sent = bytes(range(256)) * 1000  # 256,000 bytes: the buffer, then pieces
            client.write(sent)
            await client.drain()
            client.close()
            await wait_until(lambda: errors, DEADLINE, "the read to end early")
            assert errors[0].partial == sent
            assert errors[0].expected == 8 * 1024 * 1024
        finally:
            client.close()
            await listener.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


# ---- 2. frames that declare a huge body and never send it -----------------------------------


def test_declared_but_unsent_bodies_cost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def main(scene: Scene) -> None:
        server = await scene.server()
        hostile = scene.attacker(server)
        streams = [await hostile.handshake() for _ in range(16)]
        await wait_until(lambda: len(server.open_connections()) == 16, DEADLINE, "16 hostile connections")
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            for stream in streams:
                await hostile.declare_body(stream, 64 * 1024 * 1024, b"13 bytes sent")
            await wait_until(
                lambda: all(
                    tcp_of(c._stream)._waiter is not None and tcp_of(c._stream)._start == tcp_of(c._stream)._end
                    for c in server.open_connections()
                ),
                DEADLINE,
                "the server to read what was sent and wait for the rest",
            )
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert after - before < 16 * 1024 * 1024, f"{(after - before) / 2**20:.0f} MiB for 16 x 13 bytes"
        assert all(len(tcp_of(c._stream)._buffer) <= _INITIAL_BUFFER_BYTES for c in server.open_connections())
        await scene.assert_serves(server)
        no_tracebacks(caplog)

    run(main)


# ---- 3. requests whose replies are never read -----------------------------------------------


def test_peer_that_does_not_read_its_replies_is_disconnected(caplog: pytest.LogCaptureFixture) -> None:
    limit = 6 * 1024 * 1024  # over the 4 MiB write high-water mark: closing drops the queue at once

    async def main(scene: Scene) -> None:
        server = await scene.server(max_queued_bytes=limit, max_requests_per_second=1e6, request_burst=10**6)
        hostile = scene.attacker(server)
        me = Identity.generate()
        stream = await hostile.handshake(me)
        await wait_until(lambda: connections_of(server, {me.peer_id}), DEADLINE, "the hostile connection")
        (conn,) = connections_of(server, {me.peer_id})
        most_queued = 0

        def watch() -> bool:
            nonlocal most_queued
            most_queued = max(most_queued, tcp_of(conn._stream).write_buffer_size())
            return conn.is_closed

        sender = asyncio.ensure_future(hostile.flood(stream, "find", {"key": b"k" * 20}, 4000))
        try:
            await wait_until(watch, 3 * DEADLINE, "the server to drop the peer that does not read", interval=0.001)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        assert most_queued <= limit + 1024  # a reply that would go past the limit is not queued
        server_side = tcp_of(conn._stream)
        await wait_until(lambda: server_side._lost, DEADLINE, "the socket and its send queue to be released")
        assert len(lines_with(caplog, "does not read its replies")) == 1
        await scene.assert_serves(server)
        no_tracebacks(caplog)

    run(main)


# ---- 4. connection caps ---------------------------------------------------------------------


def test_connection_caps_evict_idle_connections_and_keep_the_node_reachable(caplog: pytest.LogCaptureFixture) -> None:
    async def main(scene: Scene) -> None:
        server = await scene.server(max_connections=8, max_connections_per_peer=2)
        hostile = scene.attacker(server)
        one = Identity.generate()
        for _ in range(5):  # duplicates of one peer ID: only the 2 most recent stay
            await hostile.handshake(one)
        await wait_until(lambda: len(connections_of(server, {one.peer_id})) == 2, DEADLINE, "2 connections of one")
        ids = [Identity.generate() for _ in range(12)]
        for identity in ids:
            await hostile.handshake(identity)
        await wait_until(
            lambda: connections_of(server, {ids[-1].peer_id}) and not server._pending_handshakes,
            DEADLINE,
            "every stranger's handshake to be done",
        )
        assert len(server.open_connections()) == 8
        await scene.assert_serves(server)  # at the cap: an idle connection made room
        assert len(server.open_connections()) == 8
        assert len(lines_with(caplog, "max_connections_per_peer=2")) == 1  # 3 evictions, one line
        assert len(lines_with(caplog, "(max_connections=8)")) == 1
        no_tracebacks(caplog)

    run(main)


def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def main(scene: Scene) -> None:
        server = await scene.server(max_connections=3)
        clients = [Host(Identity.generate()) for _ in range(3)]
        scene.hosts.extend(clients)
        address = server.visible_maddrs()[0]
        calls = [asyncio.ensure_future(c.call(address, "hang", None, timeout=30)) for c in clients]
        await wait_until(
            lambda: len(server.open_connections()) == 3 and all(c.busy for c in server.open_connections()),
            DEADLINE,
            "3 busy connections",
        )
        late = Host(Identity.generate())
        scene.hosts.append(late)
        with pytest.raises(Exception, match="connection limit"):
            await late.call(address, "echo", None, timeout=DEADLINE)
        assert len(lines_with(caplog, "all busy (max_connections=3)")) == 1
        for client in clients:  # their calls fail; the server's handlers are cancelled
            await client.aclose()
        await asyncio.gather(*calls, return_exceptions=True)
        await wait_until(lambda: not server.open_connections(), DEADLINE, "the busy connections to close")
        await scene.assert_serves(server)
        no_tracebacks(caplog)

    run(main)


def test_default_max_connections_leaves_descriptors_to_spare() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = 1024 if soft == resource.RLIM_INFINITY else min(1024, soft - 64)
    assert default_max_connections() == expected
    assert Host(Identity.generate()).settings.max_connections == expected
    assert Host(Identity.generate(), settings=NetSettings(max_connections=7)).settings.max_connections == 7


# ---- 5. request rate and concurrency --------------------------------------------------------


def test_requests_over_the_rate_are_refused_and_a_flooder_is_disconnected(caplog: pytest.LogCaptureFixture) -> None:
    async def main(scene: Scene) -> None:
        server = await scene.server(max_requests_per_second=20, request_burst=50)
        hostile = scene.attacker(server)
        me = Identity.generate()
        stream = await hostile.handshake(me)
        start = asyncio.get_running_loop().time()
        next_id = await hostile.flood(stream, "echo", None, 100)
        replies = [await asyncio.wait_for(read_frame(stream, RAW_LIMITS), DEADLINE) for _ in range(100)]
        elapsed = asyncio.get_running_loop().time() - start
        answered = [h for h, _ in replies if h[0] == 5]
        refused = [h for h, _ in replies if h[0] == 3]
        assert len(answered) + len(refused) == 100
        assert 50 <= len(answered) <= 50 + 20 * elapsed + 1
        assert refused and all(h[2] == "rate limit exceeded" for h in refused)
        # far over, for long: 2 x burst refusals within 10 s and it is gone
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await hostile.flood(stream, "echo", None, 400, first_id=next_id)
            while True:
                await asyncio.wait_for(read_frame(stream, RAW_LIMITS), DEADLINE)
        await wait_until(lambda: not connections_of(server, {me.peer_id}), DEADLINE, "the flooder to be dropped")
        assert len(lines_with(caplog, "refusals within 10 s (rate limit exceeded)")) == 1
        await scene.assert_serves(server)
        no_tracebacks(caplog)

    run(main)


def test_a_flooder_that_lets_a_few_requests_through_is_disconnected_too(caplog: pytest.LogCaptureFixture) -> None:
    """Pauses that refill a token or two (so some requests are answered) do not save a peer that
    sends far over the rate: refusals count over a window, not in a row."""

    async def main(scene: Scene) -> None:
        server = await scene.server(max_requests_per_second=20, request_burst=50)
        hostile = scene.attacker(server)
        me = Identity.generate()
        stream = await hostile.handshake(me)
        reader = asyncio.ensure_future(_read_until_closed(stream))
        next_id = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(20):  # 40 requests, then a pause that refills about one token
                next_id = await hostile.flood(stream, "echo", None, 40, first_id=next_id)
                await asyncio.sleep(0.06)
        await wait_until(lambda: not connections_of(server, {me.peer_id}), DEADLINE, "the flooder to be dropped")
        answered = await asyncio.wait_for(reader, DEADLINE)
        assert answered >= 50  # some got through, and it was cut off all the same
        assert len(lines_with(caplog, "refusals within 10 s (rate limit exceeded)")) == 1
        await scene.assert_serves(server)

    run(main)


async def _read_until_closed(stream: ByteStream) -> int:
    """Read frames until the peer hangs up; how many were answers (RESPONSE)."""
    answered = 0
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            header, _ = await read_frame(stream, RAW_LIMITS)
            answered += header[0] == 5
    return answered


def test_too_many_concurrent_requests_are_refused() -> None:
    async def main(scene: Scene) -> None:
        server = await scene.server(max_concurrent_requests=4)
        hostile = scene.attacker(server)
        stream = await hostile.handshake()
        await hostile.flood(stream, "hang", None, 6)
        header, _ = await asyncio.wait_for(read_frame(stream, RAW_LIMITS), DEADLINE)
        assert header == [3, 8, "too many concurrent requests"]
        header, _ = await asyncio.wait_for(read_frame(stream, RAW_LIMITS), DEADLINE)
        assert header == [3, 10, "too many concurrent requests"]
        await scene.assert_serves(server)

    run(main)


def test_an_honest_client_under_the_limits_is_never_refused() -> None:
    async def main(scene: Scene) -> None:
        server = await scene.server(max_requests_per_second=100, request_burst=200)
        client = Host(Identity.generate())
        scene.hosts.append(client)
        address = server.visible_maddrs()[0]
        replies = await asyncio.gather(*(client.call(address, "echo", i, timeout=DEADLINE) for i in range(200)))
        assert [r.payload["payload"] for r in replies] == list(range(200))
        more = await asyncio.gather(
            *(client.call(address, "echo", i, timeout=DEADLINE) for i in range(400)), return_exceptions=True
        )
        refused = [e for e in more if isinstance(e, RemoteError)]
        assert refused and all("rate limit exceeded" in str(e) for e in refused)
        assert client.connection_to(server.peer_id) is not None  # refused, not disconnected

    run(main)


# ---- 6. deeply nested msgpack ---------------------------------------------------------------


def test_deep_msgpack_is_refused_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def main(scene: Scene) -> None:
        server = await scene.server()
        server.add_inline_handler("show", lambda conn, payload, body: repr(payload))
        hostile = scene.attacker(server)
        me = Identity.generate()
        stream = await hostile.handshake(me)
        await hostile.request_with_payload(stream, 0, "show", HostilePeer.deep(1000))
        header, _ = await asyncio.wait_for(read_frame(stream, RAW_LIMITS), DEADLINE)
        assert header[0] == 6 and "nested more than 32 levels" in header[2]  # GOAWAY
        await wait_until(lambda: not connections_of(server, {me.peer_id}), DEADLINE, "the peer to be dropped")
        assert len(lines_with(caplog, "nested more than 32 levels")) == 1
        await scene.assert_serves(server)
        no_tracebacks(caplog)

    run(main)


def test_unpack_checks_nesting_without_recursion() -> None:
    assert unpack(HostilePeer.deep(31)) is not None
    with pytest.raises(MalformedFrameError, match="nested more than 32 levels"):
        unpack(HostilePeer.deep(33))
    with pytest.raises(MalformedFrameError, match="nested more than 4 levels"):
        unpack(b"\x81\xa1k" + HostilePeer.deep(4), max_nesting=4)  # {"k": [[[[None]]]]}
    wide = b"\xdd\x00\x01\x00\x00" + b"\x90" * 65536  # a list of 65,536 empty lists: wide, not deep
    assert len(unpack(wide)) == 65536


def test_describe_never_formats_much_of_a_value() -> None:
    huge = [b"x" * 10_000_000, "y" * 10_000_000, list(range(1_000_000)), {i: i for i in range(1000)}]
    text = describe(huge)
    assert len(text) <= 80
    nested: list[Any] = []
    for _ in range(5000):  # deeper than the recursion limit: describe must not walk it all
        nested = [nested]
    assert len(describe(nested)) <= 80
    assert describe("short") == "short"


def test_limit_log_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    log = LimitLog(logging.getLogger("hivecli.test"), interval=3600)
    with caplog.at_level(logging.WARNING, logger="hivecli.test"):
        for i in range(5):
            log.warning("a", "event a %d", i)
        log.warning("b", "event b")
        log._last["a"] -= 7200  # an hour later
        log.warning("a", "event a again")
    assert [r.getMessage() for r in caplog.records] == [
        "event a 0",
        "event b",
        "event a again (4 more like this in the last 7200 s were not logged)",
    ]


def test_a_dial_that_fails_after_its_callers_gave_up_logs_nothing() -> None:
    """Its callers timed out first: the dial's own failure is nobody's to report, and asyncio
    must not print it as "Task exception was never retrieved" with a traceback."""

    async def main() -> list[dict[str, Any]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
        accepted: list[asyncio.StreamWriter] = []
        silent = await asyncio.start_server(lambda _r, w: accepted.append(w), "127.0.0.1", 0)  # never answers
        port = silent.sockets[0].getsockname()[1]
        host = Host(Identity.generate(), settings=NetSettings(handshake_timeout=0.2))
        target = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}")
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(host.connect(target), 0.02)
            await wait_until(lambda: not host._dials, DEADLINE, "the dial to fail on its own")
            gc.collect()
            await asyncio.sleep(0)
        finally:
            await host.aclose()
            for writer in accepted:
                writer.close()
            silent.close()
            await silent.wait_closed()
        return reported

    assert asyncio.run(main()) == []


def test_an_address_whose_peers_keep_flooding_is_refused_for_a_while(caplog: pytest.LogCaptureFixture) -> None:
    """A flooder that comes back at once under a fresh identity (with a fresh allowance) would
    keep the node's loop busy refusing it: after max_offences_per_host drops in a minute, new
    connections from its address are refused before the handshake. Connections already open
    (an honest peer at the same address) go on."""

    async def main(scene: Scene) -> None:
        server = await scene.server(max_requests_per_second=20, request_burst=10, max_offences_per_host=3)
        honest = Host(Identity.generate())
        scene.hosts.append(honest)
        address = server.visible_maddrs()[0]
        assert (await honest.call(address, "echo", 1, timeout=DEADLINE)).payload == {"payload": 1}
        hostile = scene.attacker(server)
        for _ in range(3):  # three identities, each flooding until it is dropped
            me = Identity.generate()
            stream = await hostile.handshake(me)
            reader = asyncio.ensure_future(_read_until_closed(stream))
            with contextlib.suppress(ConnectionError):
                await hostile.flood(stream, "echo", None, 100)
            await asyncio.wait_for(reader, DEADLINE)
            await wait_until(lambda me=me: not connections_of(server, {me.peer_id}), DEADLINE, "the drop")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, HandshakeError)):
            await hostile.handshake()  # a fourth identity from the same address: refused at once
        assert len(lines_with(caplog, "of its connections broke limits in the last 60 s")) == 1
        assert (await honest.call(address, "echo", 2, timeout=DEADLINE)).payload == {"payload": 2}

    run(main)
