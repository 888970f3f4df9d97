"""Encrypted links and private swarms: the v2 handshake and `SecureStream`, end to end.

The handshakes run over real TCP on 127.0.0.1. `Relay` sits on the wire between the two ends
and parses what passes (handshake frames, then encrypted records) so that tests can modify,
replay, reorder or drop exactly one record, or swap the ephemeral keys as a man in the middle.
Hypothesis feeds hostile bytes and maps to the handshake and the record layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import struct
import sys
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivecli._exceptions import ConfigError, FrameTooLargeError, HandshakeError, ProtocolError
from hivecli.net import ByteStream, Identity, Multiaddr, TCPTransport
from hivecli.net.framing import FrameLimits, encode_frame, read_frame
from hivecli.net.handshake import PROTOCOL_VERSION, HandshakeResult, perform_handshake
from hivecli.net.secure import (
    MAX_RECORD_BYTES,
    SWARM_KEY_HEADER,
    RecordIntegrityError,
    SecureStream,
    SecuritySettings,
    generate_swarm_key,
    load_swarm_key,
    swarm_key_fingerprint,
)
from hivecli.net.tcp import _SO_MAX_PACING_RATE as SO_MAX_PACING_RATE
from hivecli.net.transport import MemoryTransport

DEADLINE = 10.0
LIMITS = FrameLimits()
LISTEN = Multiaddr.parse("/ip4/127.0.0.1/tcp/4001")
SWARM_A, SWARM_B = os.urandom(32), os.urandom(32)
# every failure a hostile peer may cause; anything else escaping perform_handshake is a bug
EXPECTED_FAILURES = (ProtocolError, asyncio.IncompleteReadError, ConnectionError)


# what a test opened (streams, relays); `run` closes it all at the end, pass or fail
_OPEN: list[ByteStream | Relay] = []


def run(main: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        try:
            await asyncio.wait_for(main(), timeout)
        finally:
            while _OPEN:
                thing = _OPEN.pop()
                if isinstance(thing, Relay):
                    await thing.aclose()
                else:
                    thing.close()
            await asyncio.sleep(0.01)  # let the transports finish closing their sockets

    asyncio.run(bounded())


def raw_frame(header: Any) -> bytes:
    head, body = encode_frame(header)
    return head + bytes(body)


async def send_frame(stream: ByteStream, header: Any) -> None:
    stream.write(raw_frame(header))
    await stream.drain()


async def read_header(stream: ByteStream) -> Any:
    header, _ = await asyncio.wait_for(read_frame(stream, LIMITS), DEADLINE)
    return header


# ---- two ends over TCP, optionally through a relay ----------------------------------------------


class Relay:
    """A TCP relay that parses the traffic it forwards, per direction ("c2s" and "s2c").

    The first `handshake_frames` frames of each direction go through `on_frame` (decoded
    msgpack header in, header out); after them every encrypted record goes through
    `on_record(direction, index, record)`, which returns the records to forward instead.
    """

    def __init__(
        self,
        handshake_frames: int,
        on_frame: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
        on_record: Callable[[str, int, bytes], list[bytes]] | None = None,
    ) -> None:
        self.handshake_frames = handshake_frames
        self.on_frame = on_frame or (lambda direction, header: header)
        self.on_record = on_record or (lambda direction, index, record: [record])
        self.frames: dict[str, list[dict[str, Any]]] = {"c2s": [], "s2c": []}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        _OPEN.append(self)

    async def start(self, target_port: int) -> int:
        async def on_client(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
            for args in ((client_reader, server_writer, "c2s"), (server_reader, client_writer, "s2c")):
                task = asyncio.ensure_future(self._pump(*args))
                self._tasks.add(task)

        self._server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            for _ in range(self.handshake_frames):
                prefix = await reader.readexactly(8)
                header_len, _ = struct.unpack(">II", prefix)
                header = msgpack.unpackb(await reader.readexactly(header_len), raw=False)
                self.frames[direction].append(header)
                writer.write(raw_frame(self.on_frame(direction, header)))
            index = 0
            while True:
                length = await reader.readexactly(4)
                record = length + await reader.readexactly(struct.unpack(">I", length)[0] + 16)
                for out in self.on_record(direction, index, record):
                    writer.write(out)
                index += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def tcp_pair(relay: Relay | None = None) -> tuple[ByteStream, ByteStream]:
    """(client end, server end) of a fresh TCP connection, through `relay` if given."""
    transport = TCPTransport()
    accepted: asyncio.Future[ByteStream] = asyncio.get_running_loop().create_future()

    async def handler(stream: ByteStream) -> None:
        if not accepted.done():
            accepted.set_result(stream)

    listener = await transport.listen("127.0.0.1", 0, handler)
    port = listener.bound[0][1]
    if relay is not None:
        port = await relay.start(port)
    client = await transport.dial("127.0.0.1", port, DEADLINE)
    server = await asyncio.wait_for(accepted, DEADLINE)
    _OPEN.extend((client, server))
    await listener.aclose()
    return client, server


async def closing_on_error(stream: ByteStream, handshake: Coroutine[Any, Any, HandshakeResult]) -> HandshakeResult:
    """Run a handshake and close the stream if it fails, as Host does."""
    try:
        return await handshake
    except BaseException:
        stream.close()
        raise


SEALED = SecuritySettings(encrypt_same_host=True)


async def handshake_both(
    client_security: SecuritySettings | None = None,
    server_security: SecuritySettings | None = None,
    relay: Relay | None = None,
) -> tuple[HandshakeResult | BaseException, HandshakeResult | BaseException, Identity, Identity]:
    """Handshake over TCP; returns each side's result or exception and the two identities.
    Both ends are on this host: without settings, each side seals even so (SEALED), as links
    between hosts are."""
    client_id, server_id = Identity.generate(), Identity.generate()
    client_security = SEALED if client_security is None else client_security
    server_security = SEALED if server_security is None else server_security
    client, server = await tcp_pair(relay)
    dialer = perform_handshake(client, client_id, [LISTEN], server_id.peer_id, "server", client_security)
    acceptor = perform_handshake(server, server_id, [], None, "client", server_security)
    client_result, server_result = await asyncio.wait_for(
        asyncio.gather(closing_on_error(client, dialer), closing_on_error(server, acceptor), return_exceptions=True),
        DEADLINE,
    )
    return client_result, server_result, client_id, server_id


async def secure_pair(relay: Relay | None = None) -> tuple[ByteStream, ByteStream]:
    client, server, _, _ = await handshake_both(relay=relay)
    assert isinstance(client, HandshakeResult) and isinstance(server, HandshakeResult), (client, server)
    return client.stream, server.stream


async def assert_closed(stream: ByteStream) -> None:
    """The other end closed `stream`: reading ends within the deadline."""
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ProtocolError)):
        await asyncio.wait_for(stream.read_exactly(1), DEADLINE)


# ---- working links -----------------------------------------------------------------------------


def test_handshake_encrypts_and_frames_round_trip_both_ways() -> None:
    async def main() -> None:
        relay = Relay(handshake_frames=2)
        client, server, client_id, server_id = await handshake_both(relay=relay)
        assert isinstance(client, HandshakeResult) and isinstance(server, HandshakeResult)
        assert client.remote_peer == server_id.peer_id and server.remote_peer == client_id.peer_id
        assert server.listen == [LISTEN.with_peer_id(client_id.peer_id)]
        assert isinstance(client.stream, SecureStream) and isinstance(server.stream, SecureStream)
        for n in range(3):
            await send_frame(client.stream, ["ping", n, "ünïcødé"])
            await send_frame(server.stream, {"pong": n, "bytes": b"\x00\xff" * n})
        for n in range(3):
            assert await read_header(server.stream) == ["ping", n, "ünïcødé"]
            assert await read_header(client.stream) == {"pong": n, "bytes": b"\x00\xff" * n}
        # the handshake did not show the listen addresses' text in any HELLO
        assert all("listen" not in hello for hello in (relay.frames["c2s"][0], relay.frames["s2c"][0]))
        client.stream.close()
        await assert_closed(server.stream)

    run(main)


def test_64_mib_payload_arrives_intact_through_read_into() -> None:
    async def main() -> None:
        client, server = await secure_pair()
        payload = memoryview(os.urandom(64 * 1024 * 1024))
        header = b"13-byte-head!"

        async def send() -> None:
            client.write(header)  # a small record first: read_into must start mid-record later
            for start in range(0, len(payload), 3 * 1024 * 1024 + 7):  # writes that do not align with records
                client.write(payload[start : start + 3 * 1024 * 1024 + 7])
                await client.drain()

        async def receive() -> bytearray:
            target = bytearray(len(payload))
            assert await server.read_exactly(len(header)) == header
            view = memoryview(target)
            for start in range(0, len(target), 5 * 1024 * 1024 + 3):  # nor do the reads
                await server.read_into(view[start : start + 5 * 1024 * 1024 + 3])
            return target

        _, received = await asyncio.gather(send(), receive())
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        client.close()
        server.close()

    run(main)


@pytest.mark.skipif(sys.platform != "linux", reason="SO_MAX_PACING_RATE is Linux's")
def test_an_encrypted_tcp_link_paces_its_socket_and_a_memory_one_cannot() -> None:
    async def main() -> None:
        client, _ = await secure_pair()
        sock = client._inner._transport.get_extra_info("socket")  # type: ignore[attr-defined]
        assert client.set_max_rate(4.7e6) is True
        assert sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE) == 4_700_000
        assert client.set_max_rate(None) is True  # no limit again: the kernel's ~0
        assert sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE) in (-1, 2**32 - 1)
        client.close()  # a link that closed during a round: nothing to pace, and no error either
        assert client.set_max_rate(None) is False
        network = MemoryTransport.Network()
        a, b = MemoryTransport(network), MemoryTransport(network)
        listener = await a.listen("10.0.0.1", 1, lambda stream: asyncio.sleep(0))
        memory = await b.dial("10.0.0.1", 1, DEADLINE)
        _OPEN.append(memory)
        assert memory.set_max_rate(1e6) is False
        await listener.aclose()

    run(main)


@pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO's byte counts are Linux's")
def test_an_encrypted_tcp_link_counts_what_the_other_end_acknowledged_and_a_memory_one_cannot() -> None:
    async def main() -> None:
        client, server = await secure_pair()
        before = client.send_stats()
        assert before is not None and before.retransmitted == 0
        payload = os.urandom(3_000_000)
        reading = asyncio.ensure_future(asyncio.wait_for(server.read_exactly(len(payload)), DEADLINE))
        client.write(payload)
        await client.drain()
        assert await reading == payload
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while (stats := client.send_stats()) is not None and stats.acked - before.acked < len(payload):
            assert loop.time() < deadline, f"only {stats.acked - before.acked} of {len(payload)} bytes acknowledged"
            await asyncio.sleep(0.01)  # the last acknowledgements are on their way back
        assert stats is not None and stats.retransmitted == 0  # loopback loses nothing
        assert stats.unsent == 0  # all on its way, and acknowledged
        client.close()
        assert client.send_stats() is None  # closed: nothing to read
        network = MemoryTransport.Network()
        a, b = MemoryTransport(network), MemoryTransport(network)
        listener = await a.listen("10.0.0.1", 1, lambda stream: asyncio.sleep(0))
        memory = await b.dial("10.0.0.1", 1, DEADLINE)
        _OPEN.append(memory)
        assert memory.send_stats() is None
        await listener.aclose()

    run(main)


def test_links_are_plain_only_when_both_ends_turn_encryption_off() -> None:
    async def main() -> None:
        off = SecuritySettings(encrypt=False)
        client, server, _, _ = await handshake_both(off, off)
        assert isinstance(client, HandshakeResult) and isinstance(server, HandshakeResult)
        assert not isinstance(client.stream, SecureStream) and not isinstance(server.stream, SecureStream)
        await send_frame(client.stream, ["plain"])
        assert await read_header(server.stream) == ["plain"]
        client.stream.close()

    run(main)


@pytest.mark.parametrize(
    ("client_security", "server_security", "sealed"),
    [
        (SecuritySettings(), SecuritySettings(), False),
        (SecuritySettings(), SEALED, True),
        (SEALED, SecuritySettings(), True),
        (SecuritySettings(swarm_key=SWARM_A), SecuritySettings(swarm_key=SWARM_A), False),
    ],
    ids=["both-allow", "server-seals", "client-seals", "private-swarm"],
)
def test_a_same_host_link_goes_unsealed_only_when_both_ends_allow_it(
    client_security: SecuritySettings, server_security: SecuritySettings, sealed: bool
) -> None:
    async def main() -> None:
        client, server, client_id, server_id = await handshake_both(client_security, server_security)
        assert isinstance(client, HandshakeResult) and isinstance(server, HandshakeResult), (client, server)
        assert client.remote_peer == server_id.peer_id and server.remote_peer == client_id.peer_id  # authenticated
        assert client.stream.same_host and server.stream.same_host
        assert client.stream.sealed is server.stream.sealed is sealed
        await send_frame(client.stream, ["hello", sealed])
        assert await read_header(server.stream) == ["hello", sealed]
        client.stream.close()
        await assert_closed(server.stream)

    run(main)


def test_a_peer_that_predates_the_same_host_flag_gets_a_sealed_link() -> None:
    """An older peer sends no same_host field and hashes its transcript without the flags."""

    async def main() -> None:
        client_id, server_id = Identity.generate(), Identity.generate()
        client, server = await tcp_pair()
        client.same_host = None  # type: ignore[assignment]  # makes our HELLO leave the field out
        dialer = perform_handshake(client, client_id, [], server_id.peer_id, "server", SecuritySettings())
        acceptor = perform_handshake(server, server_id, [], None, "client", SecuritySettings())
        results = await asyncio.wait_for(asyncio.gather(dialer, acceptor), DEADLINE)
        assert all(result.stream.sealed for result in results)
        await send_frame(results[0].stream, ["sealed"])
        assert await read_header(results[1].stream) == ["sealed"]

    run(main)


def test_a_flipped_same_host_flag_fails_the_signature() -> None:
    """No one on the path can make a sealing side think the other lets the link go unsealed."""

    async def main() -> None:
        def flip(direction: str, header: dict[str, Any]) -> dict[str, Any]:
            return {**header, "same_host": True} if direction == "s2c" and "same_host" in header else header

        relay = Relay(handshake_frames=2, on_frame=flip)
        client, server, _, _ = await handshake_both(SecuritySettings(), SEALED, relay=relay)
        assert relay.frames["s2c"][0]["same_host"] is False  # the server seals: it said so
        assert isinstance(client, HandshakeError) and isinstance(server, HandshakeError)
        assert "cannot prove it holds that peer's key" in str(client)

    run(main)


@pytest.mark.parametrize(
    ("local", "remote", "same"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", True),
        ("::1", "::1", True),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.2", True),  # a dual-stack socket's view of IPv4 loopback
        ("10.0.0.5", "10.0.0.5", True),  # one of our addresses to itself: delivered locally
        ("10.0.0.5", "10.0.0.6", False),
        ("127.0.0.1", "10.0.0.5", False),
        ("::ffff:10.0.0.5", "::ffff:10.0.0.6", False),
        ("not an address", "127.0.0.1", False),
    ],
)
def test_same_host_means_both_ends_loopback_or_one_address(local: str, remote: str, same: bool) -> None:
    from types import SimpleNamespace

    from hivecli.net.transport import same_host_socket

    sock = SimpleNamespace(getsockname=lambda: (local, 1), getpeername=lambda: (remote, 2))
    assert same_host_socket(sock) is same  # type: ignore[arg-type]


def test_a_closed_socket_is_not_same_host() -> None:
    from hivecli.net.transport import same_host_socket

    with socket.socket() as sock:
        assert same_host_socket(sock) is False  # not connected: getpeername raises


def test_a_memory_link_is_never_same_host() -> None:
    async def main() -> None:
        network = MemoryTransport.Network()
        a, b = MemoryTransport(network), MemoryTransport(network)
        accepted: asyncio.Future[ByteStream] = asyncio.get_running_loop().create_future()
        listener = await a.listen("10.0.0.1", 1, lambda stream: accepted.set_result(stream) or asyncio.sleep(0))
        client = await b.dial("10.0.0.1", 1, DEADLINE)
        server = await asyncio.wait_for(accepted, DEADLINE)
        _OPEN.extend((client, server))
        client_id, server_id = Identity.generate(), Identity.generate()
        results = await asyncio.wait_for(
            asyncio.gather(
                perform_handshake(client, client_id, [], server_id.peer_id, "server"),
                perform_handshake(server, server_id, [], None, "client"),
            ),
            DEADLINE,
        )
        assert not client.same_host and all(result.stream.sealed for result in results)
        await listener.aclose()

    run(main)


def test_encryption_off_on_one_side_only_fails_clearly_on_both() -> None:
    async def main() -> None:
        client, server, _, _ = await handshake_both(SecuritySettings(encrypt=False), SecuritySettings())
        assert isinstance(client, HandshakeError) and isinstance(server, HandshakeError)
        assert "requires encrypted links, but this node has encryption turned off" in str(client)
        assert "has encryption turned off, but this node requires encrypted links" in str(server)

    run(main)


def test_swarm_members_with_the_same_key_connect() -> None:
    async def main() -> None:
        member = SecuritySettings(swarm_key=SWARM_A, encrypt_same_host=True)
        client, server, _, _ = await handshake_both(member, member, relay=Relay(handshake_frames=3))
        assert isinstance(client, HandshakeResult) and isinstance(server, HandshakeResult)
        await send_frame(client.stream, ["private", "hello"])
        assert await read_header(server.stream) == ["private", "hello"]
        client.stream.close()

    run(main)


def test_wrong_swarm_key_fails_and_the_outsider_learns_nothing_more() -> None:
    async def main() -> None:
        relay = Relay(handshake_frames=3)
        client, server, _, _ = await handshake_both(
            SecuritySettings(swarm_key=SWARM_B), SecuritySettings(swarm_key=SWARM_A), relay=relay
        )
        assert isinstance(client, HandshakeError) and isinstance(server, HandshakeError)
        assert str(server) == (
            f"peer at client does not hold this swarm's key (fingerprint {swarm_key_fingerprint(SWARM_A)})"
        )
        assert str(client) == (
            f"peer at server does not hold this swarm's key (fingerprint {swarm_key_fingerprint(SWARM_B)})"
        )
        for frames in relay.frames.values():  # HELLO and PROOF only: no signature, no addresses
            assert [sorted(frame) for frame in frames] == [
                ["encrypt", "ephemeral", "nonce", "peer_id", "private", "protocol", "same_host", "version"],
                ["swarm_proof"],
            ]

    run(main)


def test_a_swarm_key_on_one_side_only_fails_clearly_on_both() -> None:
    async def main() -> None:
        client, server, _, _ = await handshake_both(SecuritySettings(), SecuritySettings(swarm_key=SWARM_A))
        assert isinstance(client, HandshakeError) and isinstance(server, HandshakeError)
        assert "belongs to a private swarm" in str(client) and "does not have" in str(client)
        assert "holds no swarm key" in str(server) and swarm_key_fingerprint(SWARM_A) in str(server)

    run(main)


# ---- attacks on the wire -----------------------------------------------------------------------


def test_man_in_the_middle_substituting_ephemeral_keys_fails_the_signature() -> None:
    async def main() -> None:
        mitm_key = X25519PrivateKey.generate().public_key().public_bytes_raw()

        def swap(direction: str, header: dict[str, Any]) -> dict[str, Any]:
            return {**header, "ephemeral": mitm_key} if "ephemeral" in header else header

        client, server, _, server_id = await handshake_both(relay=Relay(handshake_frames=2, on_frame=swap))
        assert isinstance(client, HandshakeError) and isinstance(server, HandshakeError)
        assert f"claims to be {server_id.peer_id} but cannot prove it holds that peer's key" in str(client)
        assert "cannot prove it holds that peer's key" in str(server)

    run(main)


def test_a_reflected_hello_is_refused() -> None:
    """A 'peer' that echoes our own bytes back is this node itself, not someone to talk to."""

    async def main() -> None:
        client, server = await tcp_pair()

        async def echo() -> None:
            try:
                while True:
                    server.write(await server.read_exactly(1))
            except (asyncio.IncompleteReadError, ConnectionError):
                pass

        echo_task = asyncio.ensure_future(echo())
        with pytest.raises(HandshakeError, match="this node's own peer ID"):
            await asyncio.wait_for(perform_handshake(client, Identity.generate(), [], None, "echo"), DEADLINE)
        client.close()
        await echo_task

    run(main)


def flip_byte(offset: int) -> Callable[[str, int, bytes], list[bytes]]:
    def tamper(direction: str, index: int, record: bytes) -> list[bytes]:
        if direction == "c2s" and index == 0:
            changed = bytearray(record)
            changed[offset] ^= 0x01
            return [bytes(changed)]
        return [record]

    return tamper


@pytest.mark.parametrize(
    "tamper",
    [flip_byte(10), flip_byte(-1), flip_byte(3)],
    ids=["ciphertext", "tag", "length"],
)
def test_a_modified_record_is_detected_and_the_link_closes(tamper: Callable[[str, int, bytes], list[bytes]]) -> None:
    async def main() -> None:
        relay = Relay(handshake_frames=2, on_record=tamper)
        client, server = await secure_pair(relay)
        client.write(raw_frame(["first", "x" * 100]))
        client.write(raw_frame(["second", "y" * 100]))  # gives a lengthened record bytes to read
        await client.drain()
        with pytest.raises(RecordIntegrityError, match="integrity check failed"):
            await read_header(server)
        assert server.is_closing()
        with pytest.raises(RecordIntegrityError):  # and it stays failed
            await server.read_exactly(1)
        await assert_closed(client)

    run(main)


def replay_first() -> Callable[[str, int, bytes], list[bytes]]:
    return lambda direction, index, record: [record, record] if direction == "c2s" and index == 0 else [record]


def swap_first_two() -> Callable[[str, int, bytes], list[bytes]]:
    held: list[bytes] = []

    def reorder(direction: str, index: int, record: bytes) -> list[bytes]:
        if direction == "c2s" and index == 0:
            held.append(record)
            return []
        if direction == "c2s" and index == 1:
            return [record, *held]
        return [record]

    return reorder


def drop_first() -> Callable[[str, int, bytes], list[bytes]]:
    return lambda direction, index, record: [] if direction == "c2s" and index == 0 else [record]


@pytest.mark.parametrize(
    ("attack", "intact_frames"),
    [(replay_first(), 1), (swap_first_two(), 0), (drop_first(), 0)],
    ids=["replay", "reorder", "drop"],
)
def test_replayed_reordered_or_dropped_records_are_detected(
    attack: Callable[[str, int, bytes], list[bytes]], intact_frames: int
) -> None:
    async def main() -> None:
        relay = Relay(handshake_frames=2, on_record=attack)
        client, server = await secure_pair(relay)
        for n in range(3):
            client.write(raw_frame(["frame", n]))
        await client.drain()
        for n in range(intact_frames):
            assert await read_header(server) == ["frame", n]
        with pytest.raises(RecordIntegrityError):
            await read_header(server)
        await assert_closed(client)

    run(main)


@pytest.mark.parametrize("declared", [MAX_RECORD_BYTES + 1, 2**32 - 1])
def test_an_oversized_record_length_is_refused_before_reading_on(declared: int) -> None:
    async def main() -> None:
        client_raw, server_raw = await tcp_pair()
        client_id, server_id = Identity.generate(), Identity.generate()
        _, server = await asyncio.gather(
            perform_handshake(client_raw, client_id, [], server_id.peer_id, "server", SEALED),
            perform_handshake(server_raw, server_id, [], None, "client", SEALED),
        )
        client_raw.write(struct.pack(">I", declared))  # a record header, and nothing after it
        await client_raw.drain()
        tracemalloc.start()
        try:
            with pytest.raises(FrameTooLargeError, match=f"record of {declared} bytes"):
                await asyncio.wait_for(server.stream.read_exactly(1), DEADLINE)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024
        assert server.stream.is_closing()
        await assert_closed(client_raw)

    run(main)


def test_a_stalled_full_size_record_costs_only_what_arrived() -> None:
    """A peer that declares a maximal record and sends a few bytes makes us buffer those only."""

    async def main() -> None:
        client_raw, server_raw = await tcp_pair()
        client_id, server_id = Identity.generate(), Identity.generate()
        _, server = await asyncio.gather(
            perform_handshake(client_raw, client_id, [], server_id.peer_id, "server", SEALED),
            perform_handshake(server_raw, server_id, [], None, "client", SEALED),
        )
        client_raw.write(struct.pack(">I", MAX_RECORD_BYTES) + b"\x00" * 100)
        await client_raw.drain()
        tracemalloc.start()
        try:
            reader = asyncio.ensure_future(server.stream.read_exactly(1))
            await asyncio.sleep(0.3)
            assert not reader.done()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024
        client_raw.close()
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(reader, DEADLINE)

    run(main)


def test_a_stream_refuses_to_reuse_nonces() -> None:
    async def main() -> None:
        client, server = await secure_pair()
        assert isinstance(client, SecureStream)
        client._sent = 2**64  # as if it had sealed that many records
        with pytest.raises(ConnectionResetError, match="reusing a nonce"):
            client.write(b"one more")
        assert client.is_closing()
        await assert_closed(server)

    run(main)


# ---- hostile handshakes: fuzzing ---------------------------------------------------------------


class ScriptedStream(ByteStream):
    """Reads come from fixed bytes (then end of stream); writes are recorded."""

    def __init__(self, data: bytes) -> None:
        self.remote_host = "fuzzer"
        self._data, self._pos = data, 0
        self.written: list[bytes] = []
        self.closed = False

    async def read_exactly(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            partial = self._data[self._pos :]
            self._pos = len(self._data)
            raise asyncio.IncompleteReadError(partial, n)
        self._pos += n
        return self._data[self._pos - n : self._pos]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (a ScriptedStream never blocks), without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the coroutine waited for something a scripted stream never makes it wait for")


FUZZ_PEER = Identity.generate()
FUZZ_SECURITY = [SecuritySettings(), SecuritySettings(encrypt=False), SecuritySettings(swarm_key=SWARM_A)]
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12,
)
maddr_texts = st.sampled_from(["/ip4/10.0.0.1/tcp/4001", "/ip6/::1/tcp/1", "/dns/x/tcp/0", "/ip4/x/tcp/1", "", "/"])


def valid_hello(security: SecuritySettings) -> dict[str, Any]:
    return {
        "protocol": "hive",
        "version": PROTOCOL_VERSION,
        "peer_id": FUZZ_PEER.peer_id.to_bytes(),
        "nonce": b"\x07" * 32,
        "ephemeral": X25519PrivateKey.generate().public_key().public_bytes_raw(),
        "encrypt": security.encrypt,
        "private": security.swarm_key is not None,
    }


hello_fields = st.sampled_from(["protocol", "version", "peer_id", "nonce", "ephemeral", "encrypt", "private"])
# PROOF and AUTH maps: each field present or not, well shaped or not, plus stray fields
later_messages = st.fixed_dictionaries(
    {},
    optional={
        "signature": st.binary(min_size=64, max_size=64) | st.binary(max_size=70) | msgpack_values,
        "listen": st.lists(maddr_texts, max_size=40)
        | st.lists(maddr_texts | msgpack_values, max_size=5)
        | msgpack_values,
        "swarm_proof": st.binary(min_size=32, max_size=32) | msgpack_values,
        "extra": msgpack_values,
    },
)


def assert_fails_only_as_documented(security: SecuritySettings, data: bytes) -> None:
    stream = ScriptedStream(data)
    try:
        drive(perform_handshake(stream, Identity.generate(), [LISTEN], None, "fuzzer", security))
    except EXPECTED_FAILURES:
        return
    pytest.fail("a hostile handshake completed")  # nothing the fuzzer makes can carry a valid signature


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    security=st.sampled_from(FUZZ_SECURITY),
    # an intact HELLO half the time, so that PROOF and AUTH get fuzzed as much as HELLO
    changed=st.just({}) | st.dictionaries(hello_fields, msgpack_values, min_size=1, max_size=3),
    removed=st.just(set()) | st.sets(hello_fields, min_size=1, max_size=2),
    proof=later_messages,
    auth=later_messages,
    tail=st.binary(max_size=20),
)
def test_fuzzed_handshake_maps_fail_only_as_documented(
    security: SecuritySettings,
    changed: dict[str, Any],
    removed: set[str],
    proof: dict[str, Any],
    auth: dict[str, Any],
    tail: bytes,
) -> None:
    hello = {k: v for k, v in {**valid_hello(security), **changed}.items() if k not in removed}
    frames = [hello, proof, auth] if security.swarm_key is not None else [hello, auth]
    assert_fails_only_as_documented(security, b"".join(raw_frame(frame) for frame in frames) + tail)


@settings(max_examples=200, deadline=None)
@given(
    security=st.sampled_from(FUZZ_SECURITY),
    prefix=st.sampled_from([b"", struct.pack(">II", 12, 0), struct.pack(">II", 2**20, 0), struct.pack(">II", 3, 5)]),
    data=st.binary(max_size=200),
)
def test_fuzzed_handshake_bytes_fail_only_as_documented(security: SecuritySettings, prefix: bytes, data: bytes) -> None:
    assert_fails_only_as_documented(security, prefix + data)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300), reads=st.lists(st.integers(min_value=0, max_value=64), min_size=1, max_size=5))
def test_fuzzed_records_fail_only_as_documented(data: bytes, reads: list[int]) -> None:
    stream = SecureStream(ScriptedStream(data), os.urandom(32), os.urandom(32))
    with pytest.raises((ProtocolError, asyncio.IncompleteReadError)):
        for n in reads:
            drive(stream.read_into(memoryview(bytearray(n))) if n % 2 else stream.read_exactly(n))
        drive(stream.read_exactly(1))


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(st.integers(min_value=0, max_value=3 * MAX_RECORD_BYTES // 2), min_size=1, max_size=6),
    reads=st.lists(st.integers(min_value=1, max_value=2 * MAX_RECORD_BYTES), min_size=1, max_size=8),
    into=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_any_split_of_writes_and_reads_returns_the_same_bytes(
    writes: list[int], reads: list[int], into: list[bool]
) -> None:
    async def main() -> None:
        transport = MemoryTransport(MemoryTransport.Network())
        accepted: asyncio.Future[ByteStream] = asyncio.get_running_loop().create_future()

        async def handler(stream: ByteStream) -> None:
            accepted.set_result(stream)

        await transport.listen("a", 1, handler)
        client_raw = await transport.dial("a", 1, DEADLINE)
        k1, k2 = os.urandom(32), os.urandom(32)
        client = SecureStream(client_raw, k1, k2)
        server = SecureStream(await accepted, k2, k1)
        sent = os.urandom(sum(writes))
        pos = 0
        for n in writes:
            client.write(sent[pos : pos + n])
            pos += n
        client.close()
        received = bytearray()
        for n, use_into in zip(reads, into, strict=False):
            n = min(n, len(sent) - len(received))
            if use_into:
                target = bytearray(n)
                await server.read_into(memoryview(target))
                received += target
            else:
                received += await server.read_exactly(n)
        rest = len(sent) - len(received)
        received += await server.read_exactly(rest)
        assert received == sent
        with pytest.raises(asyncio.IncompleteReadError):
            await server.read_exactly(1)

    run(main)


# ---- swarm key files and settings --------------------------------------------------------------


def test_swarm_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "swarm.key"
    key = generate_swarm_key(path)
    assert len(key) == 32 and load_swarm_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines() == [SWARM_KEY_HEADER, key.hex()]
    fingerprint = swarm_key_fingerprint(key)
    assert len(fingerprint) == 8 and fingerprint == hashlib.sha256(key).hexdigest()[:8]
    assert swarm_key_fingerprint(os.urandom(32)) != fingerprint


def test_generate_swarm_key_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    key = generate_swarm_key(path)
    with pytest.raises(ConfigError, match="already exists") as info:
        generate_swarm_key(path)
    assert str(path) in str(info.value) and "delete it first" in str(info.value)
    assert load_swarm_key(path) == key


def test_missing_swarm_key_file_says_how_to_create_one(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.key"
    with pytest.raises(ConfigError) as info:
        load_swarm_key(path)
    message = str(info.value)
    assert str(path) in message and "does not exist" in message and f"hive keygen --swarm-key {path}" in message


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hive-swarm-key/v1\n",
        b"hive-swarm-key/v2\n" + b"ab" * 32 + b"\n",
        b"hive-swarm-key/v1\n" + b"ab" * 31 + b"\n",
        b"hive-swarm-key/v1\n" + b"zz" * 32 + b"\n",
        b"hive-swarm-key/v1\n" + b"ab" * 32 + b"\nextra\n",
        b"\xff\xfe binary junk",
        b"ab" * 32,
    ],
    ids=["empty", "header-only", "wrong-header", "short-key", "not-hex", "extra-line", "binary", "no-header"],
)
def test_bad_swarm_key_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "swarm.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_swarm_key(path)
    message = str(info.value)
    assert str(path) in message and "does not hold a hive swarm key" in message and "hive keygen" in message


def test_security_settings_check_the_key_and_keep_it_out_of_logs() -> None:
    settings = SecuritySettings(swarm_key=SWARM_A)
    assert SWARM_A.hex() not in repr(settings) and str(SWARM_A) not in repr(settings)
    assert swarm_key_fingerprint(SWARM_A) in repr(settings)
    with pytest.raises(ConfigError, match="32 bytes"):
        SecuritySettings(swarm_key=b"short")


@pytest.mark.parametrize(("version", "upgrade"), [(1, "that peer"), (PROTOCOL_VERSION + 1, "this node")])
def test_another_protocol_version_says_which_side_to_upgrade(version: int, upgrade: str) -> None:
    hello = {**valid_hello(SecuritySettings()), "version": version}
    with pytest.raises(HandshakeError) as info:
        drive(perform_handshake(ScriptedStream(raw_frame(hello)), Identity.generate(), [], None, "old", None))
    message = str(info.value)
    assert f"v{version}" in message and f"v{PROTOCOL_VERSION}" in message and f"upgrade hivecli on {upgrade}" in message
