"""Relays: how two peers that nobody can dial (both behind NAT) still reach each other.

A peer that others can dial (a relay) keeps a connection open to each unreachable peer that
asked it to (a reservation). Anyone may then reach such a peer B through relay R at

    /ip4/R_HOST/tcp/R_PORT/p2p/R_ID/p2p-circuit/p2p/B_ID

The dialer A opens a `relay.connect` stream to R naming B; R opens a `relay.incoming` stream to
B over B's reservation connection, naming A; once B accepts, R copies bytes between the two
streams. A and B then run the ordinary handshake over this circuit, end to end: the relay
forwards only bytes it cannot read (AES-GCM records after the handshake) and cannot pose as
either side (the handshake checks both identities). The circuit is a `ByteStream`, so the
connection on top of it is a normal `Connection`.

A relay bounds what it gives away (`RelaySettings`): reservations, circuits (in all, and
MAX_CIRCUITS_PER_PEER for one asking peer), and the rate of all relayed bytes together; it
counts what it relays (`RelayService.stats`, shown by `hive peers`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivecli._exceptions import ConfigError, HiveError, PeerUnreachableError
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.net.transport import ByteStream
from hivecli.utils.loops import timeout as _timeout

if TYPE_CHECKING:
    from hivecli.net.connection import Connection, Message, Stream

logger = logging.getLogger(__name__)

MAX_CIRCUITS_PER_PEER = 8  # one stranger cannot take every circuit of a relay
OK = {"ok": True}  # the first message of every relay stream that goes ahead
CHUNK_BYTES = 64 * 1024  # per relayed message: a stream's queue (64 messages) then holds at most 4 MiB
_HIGH_WATER = 1024 * 1024  # bytes a circuit stream buffers before `drain` waits


@dataclass(frozen=True)
class RelaySettings:
    """What this peer does about relays.

    Attributes:
        serve: relay for unreachable peers: None (default) unless a dial-back found that others
            cannot dial us directly, True always, False never.
        use: when unreachable, reserve a slot on a relay so that others can reach us (default True).
        max_reservations: unreachable peers we keep a slot for at once (default 64).
        max_circuits: circuits we relay at once (default 64).
        max_bytes_per_second: all relayed bytes together, both directions (default 25 MB/s,
            200 Mbit/s); a circuit over it waits, it is not dropped.
    """

    serve: bool | None = None
    use: bool = True
    max_reservations: int = 64
    max_circuits: int = 64
    max_bytes_per_second: float = 25e6

    def __post_init__(self) -> None:
        for name in ("max_reservations", "max_circuits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RelaySettings.{name} = {getattr(self, name)} must be at least 1")
        if not self.max_bytes_per_second > 0:
            raise ConfigError(f"RelaySettings.max_bytes_per_second = {self.max_bytes_per_second} must be positive")


class RelayedStream(ByteStream):
    """A byte stream carried as the bodies of one RPC stream's messages (a circuit end).

    `write` never blocks: bytes queue here and a background task sends them in CHUNK_BYTES
    messages, in order; `drain` waits until the queue is below a high-water mark.
    """

    relayed = True

    def __init__(self, stream: Stream, remote_host: str):
        self._stream = stream
        self.remote_host = remote_host
        self._inbound = bytearray()
        self._outbound: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._sent = asyncio.Event()  # set whenever the queue shrinks
        self._flusher: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    async def read_exactly(self, n: int) -> bytes:
        from hivecli.net.connection import EndOfStream

        while len(self._inbound) < n:
            try:
                message = await self._stream.recv()
            except (EndOfStream, HiveError):
                partial = bytes(self._inbound)
                self._inbound.clear()
                raise asyncio.IncompleteReadError(partial, n) from None
            self._inbound += message.body
            self.bytes_received += len(message.body)
        data = bytes(self._inbound[:n])
        del self._inbound[:n]
        return data

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._error is not None:
            raise ConnectionResetError("relayed stream is closed")
        data = bytes(data)
        for start in range(0, len(data), CHUNK_BYTES):
            self._outbound.append(data[start : start + CHUNK_BYTES])
        self._queued += len(data)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._outbound:
                chunk = self._outbound[0]
                await self._stream.send(None, chunk)
                self._outbound.popleft()
                self._queued -= len(chunk)
                self.bytes_sent += len(chunk)
                self._sent.set()
        except (HiveError, ConnectionError) as e:
            self._error = e
            self._sent.set()
            self.close()

    def write_buffer_size(self) -> int:
        return self._queued

    async def drain(self) -> None:
        while self._queued > _HIGH_WATER:
            if self._error is not None or self._closed:
                raise ConnectionResetError("relayed stream is closed")
            self._sent.clear()
            await self._sent.wait()
        if self._error is not None:
            raise ConnectionResetError(f"relayed stream failed: {self._error}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None and asyncio.current_task() is not self._flusher:
            self._flusher.cancel()
        with contextlib.suppress(RuntimeError):  # no running loop: the connection is gone anyway
            asyncio.get_running_loop().create_task(self._stream.cancel())

    def is_closing(self) -> bool:
        return self._closed


@dataclass
class RelayStats:
    """What a relay has done since it started (for `hive peers` and logs)."""

    reservations: int = 0
    circuits: int = 0
    circuits_total: int = 0
    bytes_relayed: int = 0
    refused: int = 0

    def to_wire(self) -> dict[str, int]:
        return {
            "reservations": self.reservations,
            "circuits": self.circuits,
            "circuits_total": self.circuits_total,
            "bytes": self.bytes_relayed,
            "refused": self.refused,
        }


class _RateLimiter:
    """A token bucket over bytes: `take(n)` waits until n bytes fit in the rate."""

    def __init__(self, rate: float):
        self.rate, self._clock = rate, 0.0

    async def take(self, n: int) -> None:
        now = time.monotonic()
        begin = max(self._clock, now - 0.25)  # up to 0.25 s of unused budget may burst
        self._clock = begin + n / self.rate
        if self._clock > now:
            await asyncio.sleep(self._clock - now)


class RelayService:
    """The relay side: keeps reservations and copies circuits. Owned by the Host."""

    def __init__(self, settings: RelaySettings, enabled: bool):
        self.settings = settings
        self.enabled = enabled  # the Host turns it on when others can dial us (see RelaySettings.serve)
        self.stats = RelayStats()
        self._reserved: dict[PeerID, Connection] = {}
        self._circuits_of: dict[PeerID, int] = {}  # open circuits per asking peer
        self._limiter = _RateLimiter(settings.max_bytes_per_second)

    def reserved_peers(self) -> list[PeerID]:
        return [peer for peer, conn in self._reserved.items() if not conn.is_closed]

    def has_reservation(self, peer: PeerID) -> bool:
        conn = self._reserved.get(peer)
        return conn is not None and not conn.is_closed

    async def serve_reserve(self, stream: Stream, payload: Any, body: bytes) -> None:
        """`relay.reserve`: hold a slot for the caller until it closes the stream or the connection."""
        peer, conn = stream.remote_peer, stream.connection
        self._refuse_unless(self.enabled, "this peer is not a relay (it is not reachable, or relaying is off)")
        if not self.has_reservation(peer):
            self._refuse_unless(
                len(self._reserved) < self.settings.max_reservations,
                f"this relay is full ({self.settings.max_reservations} reservations)",
            )
        self._reserved[peer] = conn
        self.stats.reservations = len(self._reserved)
        logger.info("Relaying for peer %s (%s)", peer, conn.remote_host)
        try:
            await stream.send(OK)
            with contextlib.suppress(HiveError):
                async for _ in stream:  # the client sends nothing; this returns when it leaves
                    pass
        finally:
            if self._reserved.get(peer) is conn:
                del self._reserved[peer]
            self.stats.reservations = len(self._reserved)

    async def serve_connect(self, stream: Stream, payload: Any, body: bytes) -> None:
        """`relay.connect {target}`: open a circuit from the caller to a peer we hold a slot for."""
        from hivecli.net.connection import EndOfStream

        self._refuse_unless(self.enabled, "this peer is not a relay")
        target = peer_field(payload, "target")
        conn = self._reserved.get(target)
        self._refuse_unless(conn is not None and not conn.is_closed, f"this relay holds no slot for peer {target}")
        self._refuse_unless(
            self.stats.circuits < self.settings.max_circuits,
            f"this relay is at its circuit limit ({self.settings.max_circuits})",
        )
        source = stream.remote_peer
        self._refuse_unless(
            self._circuits_of.get(source, 0) < MAX_CIRCUITS_PER_PEER,
            f"peer {source} already has {MAX_CIRCUITS_PER_PEER} circuits through this relay",
        )
        assert conn is not None
        self.stats.circuits += 1
        self.stats.circuits_total += 1
        self._circuits_of[source] = self._circuits_of.get(source, 0) + 1
        try:
            other = await conn.open_stream("relay.incoming", {"source": stream.remote_peer.to_bytes()})
            try:
                if not accepted(await other.recv(timeout=conn.settings.handshake_timeout)):
                    raise PeerUnreachableError(f"peer {target} refused the relayed connection")
                await stream.send(OK)
                await asyncio.gather(self._pipe(stream, other), self._pipe(other, stream))
            except EndOfStream:
                raise PeerUnreachableError(f"peer {target} closed the relayed connection") from None
            finally:
                await other.cancel()
        finally:
            self.stats.circuits -= 1
            self._circuits_of[source] -= 1
            if not self._circuits_of[source]:
                del self._circuits_of[source]

    async def _pipe(self, source: Stream, sink: Stream) -> None:
        """Copy message bodies from source to sink until source ends; then end sink."""
        from hivecli.net.connection import EndOfStream

        try:
            while True:
                message = await source.recv()
                size = len(message.body)
                if size > CHUNK_BYTES:
                    raise PeerUnreachableError(f"a relayed message of {size} bytes is over {CHUNK_BYTES}")
                await self._limiter.take(size)
                await sink.send(None, message.body)
                self.stats.bytes_relayed += size
        except EndOfStream:
            with contextlib.suppress(HiveError):
                await sink.end()

    def _refuse_unless(self, condition: bool, reason: str) -> None:
        if not condition:
            self.stats.refused += 1
            logger.debug("Relay request refused: %s", reason)  # routine: the asker tries another relay
            raise PeerUnreachableError(reason)


class RelayClient:
    """The unreachable side: keeps slots on relays so that others can reach us through them.

    Each reservation is a `relay.reserve` stream held open on our connection to the relay;
    when it ends (the relay left, the link broke), `on_change` is called so that the owner can
    reserve elsewhere.
    """

    def __init__(self, connect: Any, addresses_of: Any):
        self._connect = connect  # async (PeerID) -> Connection: the Host's
        self._addresses_of = addresses_of  # (PeerID) -> list[Multiaddr]: where we reached the relay
        self._held: dict[PeerID, asyncio.Task[None]] = {}
        self.on_change: Any = None  # called with no arguments whenever the set of relays changes

    @property
    def relays(self) -> list[PeerID]:
        return [peer for peer, task in self._held.items() if not task.done()]

    async def reserve(self, candidates: list[PeerID], want: int = 2, timeout: float = 5.0) -> list[PeerID]:
        """Hold slots on up to `want` relays, trying `candidates` in order; returns the relays
        held afterwards (possibly none: nobody among them relays for us)."""
        for peer in candidates:
            if len(self.relays) >= want:
                break
            if peer in self.relays:
                continue
            try:
                async with _timeout(timeout):  # in this task: no inner task whose error could go unretrieved
                    conn = await self._connect(peer)
                stream = await conn.open_stream("relay.reserve", {})
                answer = await stream.recv(timeout=timeout)
            except (HiveError, asyncio.TimeoutError, OSError) as e:
                logger.debug("Peer %s did not take a relay reservation: %s", peer, e or type(e).__name__)
                continue
            if not accepted(answer):
                await stream.cancel()
                continue
            logger.info("Reachable through relay %s", peer)
            self._held[peer] = asyncio.get_running_loop().create_task(self._hold(peer, stream))
            self._changed()
        return self.relays

    async def _hold(self, peer: PeerID, stream: Stream) -> None:
        try:
            with contextlib.suppress(HiveError):
                async for _ in stream:  # the relay sends nothing more; this returns when it ends
                    pass
            logger.info("Relay %s is gone", peer)
        finally:
            with contextlib.suppress(HiveError):
                await stream.cancel()
            if self._held.get(peer) is asyncio.current_task():
                del self._held[peer]
            self._changed()

    def circuit_maddrs(self) -> list[Multiaddr]:
        """Our addresses through the relays we hold slots on (without /p2p of our own)."""
        return [maddr.via(peer) for peer in self.relays for maddr in self._addresses_of(peer)[:2]]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def aclose(self) -> None:
        tasks = list(self._held.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._held.clear()


def accepted(message: Message) -> bool:
    """Whether a relay stream's first message is the `OK` that every step of a relay answers with."""
    return isinstance(message.payload, dict) and message.payload.get("ok") is True


def peer_field(payload: Any, name: str) -> PeerID:
    """A peer ID field of a relay request. Raises ConfigError (sent back as the error) if malformed."""
    raw = payload.get(name) if isinstance(payload, dict) else None
    if not isinstance(raw, bytes):
        raise ConfigError(f"relay request needs a {name!r} peer ID")
    try:
        return PeerID(raw)
    except ValueError as e:
        raise ConfigError(f"relay request: bad {name!r}: {e}") from None


__all__ = ["CHUNK_BYTES", "RelayClient", "RelaySettings", "RelayService", "RelayStats", "RelayedStream"]
