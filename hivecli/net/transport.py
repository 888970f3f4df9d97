"""The transport seam: byte streams between hosts, over TCP or in memory.

Everything above this module (framing, handshake, RPC, the DHT) sees only `ByteStream`,
`Listener` and `Transport`. `TCPTransport` (in `tcp.py`) is what peers use; `MemoryTransport` runs the same
logic with no sockets, for tests and for simulating thousands of nodes in one process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from hivecli._exceptions import PeerUnreachableError


def same_host_socket(sock: socket.socket) -> bool:
    """Whether a connected TCP socket's two ends are both on this host, so that its bytes never
    leave the kernel: both addresses are loopback, or they are the same address (traffic to one
    of our own addresses is delivered locally, whichever interface holds it)."""
    try:
        local_ip, remote_ip = (
            _unmapped(ipaddress.ip_address(end()[0])) for end in (sock.getsockname, sock.getpeername)
        )
    except (OSError, ValueError, TypeError, IndexError):  # closed, not IP, or an odd address
        return False
    return (local_ip.is_loopback and remote_ip.is_loopback) or local_ip == remote_ip


def _unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 address as a dual-stack socket shows it (::ffff:a.b.c.d) is that IPv4 address."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped if mapped is not None else ip


@dataclass(frozen=True)
class SendStats:
    """What the network did with a stream's bytes so far, as its TCP socket counts them:
    `acked`, bytes the other end acknowledged; `retransmitted`, bytes sent again because they
    were lost on the way (a queue on the path overflowed, or the link dropped them); and, now,
    `unsent`, bytes written to the stream that are not on the wire yet (the socket's and the
    event loop's send buffers): while there are some, the network sets the pace, not the writer."""

    acked: int
    retransmitted: int
    unsent: int


class ByteStream(ABC):
    """A reliable, ordered, bidirectional byte stream."""

    remote_host: str  # the address we see the other end connect from (or to)
    # True only for a direct TCP connection between two of this host's addresses
    # (`same_host_socket`); relayed circuits and in-memory streams are never same-host
    same_host: bool = False
    sealed: bool = False  # its bytes are encrypted and authenticated (secure.SecureStream)
    relayed: bool = False  # carried through a relay's circuit (relay.RelayedStream), not a direct link

    @abstractmethod
    async def read_exactly(self, n: int) -> bytes:
        """Read exactly n bytes. Raises asyncio.IncompleteReadError at end of stream."""

    async def read_into(self, view: memoryview) -> None:
        """Fill `view` with the next len(view) bytes. Raises asyncio.IncompleteReadError at end
        of stream. Transports that can receive straight into `view` override this."""
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        view[:] = await self.read_exactly(len(view))

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for sending; never blocks. Call `drain()` to wait for buffer space."""

    def write_buffer_size(self) -> int:
        """Bytes written but not yet handed to the network, so that code which cannot await
        `drain` can still bound what a peer that never reads makes us hold. Streams without a
        send buffer of their own (in-memory ones: bytes land in the peer's reader at once)
        report 0."""
        return 0

    @abstractmethod
    async def drain(self) -> None:
        """Wait until the send buffer is below its high-water mark. Raises ConnectionError if closed."""

    @abstractmethod
    def close(self) -> None:
        """Close both directions; idempotent."""

    @abstractmethod
    def is_closing(self) -> bool: ...

    def set_max_rate(self, bytes_per_second: float | None) -> bool:
        """Send at most `bytes_per_second` from now on (None: as fast as the network takes);
        True if the stream can pace itself (TCP, where the kernel allows it: SO_MAX_PACING_RATE).
        Streams with nothing to pace (in memory, relayed circuits) ignore it."""
        return False

    def send_stats(self) -> SendStats | None:
        """The socket's counts of acknowledged, retransmitted and unsent bytes (TCP on Linux
        4.19 or later: TCP_INFO), or None where there are none to read. Never raises."""
        return None

    def detach(self) -> socket.socket | None:
        """Take the stream out of the event loop: its socket, in blocking mode, for use on other
        threads (the stream is closed without closing the socket), or None where there is no
        socket to give (in-memory streams, relayed circuits). Only between whole messages: bytes
        already read ahead are lost, so the caller's protocol must leave none in flight."""
        return None


StreamHandler = Callable[[ByteStream], Awaitable[None]]


class Listener(ABC):
    @property
    @abstractmethod
    def bound(self) -> list[tuple[str, int]]:
        """(host, port) pairs actually bound (port 0 resolved)."""

    @abstractmethod
    async def aclose(self) -> None: ...


class Transport(ABC):
    @abstractmethod
    async def listen(self, host: str, port: int, handler: StreamHandler) -> Listener:
        """Accept streams on host:port, calling `handler` for each. Raises OSError if it cannot bind."""

    @abstractmethod
    async def dial(self, host: str, port: int, timeout: float) -> ByteStream:
        """Open a stream.

        Raises:
            PeerUnreachableError: refused, unreachable or timed out.
            ResourceExhaustedError: this process has no file descriptor left for the socket.
        """


# How Linux TCP resends what a partition drops, which decides how soon a link works after the heal:
_SYN_RESEND_S = 1.0  # a SYN is resent after 1 s, then 2 s more, 4 s more...
_RTO_MIN_S, _RTO_MAX_S = 0.2, 120.0  # unacknowledged data after 0.2 s, 0.4 s more... (at most 120 s apart)


def _next_resend(first_sent: float, now: float) -> float:
    """When TCP next resends data first sent at `first_sent` (time.monotonic()), at or after `now`."""
    rto = _RTO_MIN_S
    at = first_sent + rto
    while at < now:
        rto = min(2 * rto, _RTO_MAX_S)
        at += rto
    return at


class _MemoryWriter:
    """The writing half of an in-memory pipe: feeds the peer's StreamReader on the peer's loop.

    Across a partition of its network, what it sends (bytes, then the end of the stream) is held
    in order and delivered after the heal, at TCP's next resend: after a long partition that may
    be seconds or minutes later, as with a real connection."""

    def __init__(
        self,
        peer_reader: asyncio.StreamReader,
        peer_loop: asyncio.AbstractEventLoop,
        network: MemoryTransport.Network | None = None,
        route: tuple[str, str] = ("127.0.0.1", "127.0.0.1"),
    ):
        self._peer_reader, self._peer_loop = peer_reader, peer_loop
        self._network, self._route = network, route  # route: (our host, the peer's host)
        self.held: list[Callable[[], None]] = []  # sent across a partition, not yet delivered
        self.held_since = 0.0  # time.monotonic() when the oldest of them was sent
        self.closed = False

    def _deliver(self, method: Callable[..., None], *args: bytes) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._peer_loop:
            method(*args)
        elif not self._peer_loop.is_closed():  # the peer lives in another thread (one DHT per thread)
            self._peer_loop.call_soon_threadsafe(method, *args)

    def _send(self, action: Callable[[], None]) -> None:
        network = self._network
        if network is None or (not self.held and not network.sides):  # the common case: no partition
            action()
            return
        with network.lock:
            if self.held or network.is_cut(*self._route):  # behind held bytes, or across the cut: wait
                if not self.held:
                    self.held_since = time.monotonic()
                self.held.append(action)
                network.holding.add(self)
                return
        action()

    def flush(self) -> None:
        """Deliver what was held (on the peer's loop, so that later writes cannot overtake it;
        until then, they queue behind it)."""
        assert self._network is not None
        with self._network.lock:
            held, self.held = self.held, []
        for action in held:
            action()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise ConnectionResetError("in-memory stream is closed")
        data = bytes(data)
        self._send(lambda: self._deliver(self._peer_reader.feed_data, data))

    def close(self, then: Callable[[], None] | None = None) -> None:
        """End the stream; `then` runs when the peer receives the end (at once, unless partitioned)."""
        if not self.closed:
            self.closed = True

            def end() -> None:
                self._deliver(self._peer_reader.feed_eof)
                if then is not None:
                    then()

            self._send(end)


class _MemoryByteStream(ByteStream):
    def __init__(self, reader: asyncio.StreamReader, writer: _MemoryWriter, remote_host: str):
        self._reader, self._writer = reader, writer
        self.remote_host = remote_host
        self.other: _MemoryByteStream | None = None

    async def read_exactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        if self._writer.closed:
            raise ConnectionResetError("in-memory stream is closed")
        await asyncio.sleep(0)  # let the reader run, as a socket buffer would

    def close(self) -> None:
        # closing a socket ends both directions, but the peer finds out only when our end reaches it
        self._writer.close(then=self.other._writer.close if self.other is not None else None)

    def is_closing(self) -> bool:
        return self._writer.closed


class MemoryTransport(Transport):
    """Streams between transports that share one `MemoryTransport.Network`; no sockets involved.

    Addresses are ordinary host:port pairs inside the network; binding port 0 picks a free one.
    Hosts may run on different event loops (threads): bytes are handed over on the owner's loop.

    A transport dials from the host of its first listener (127.0.0.1 before it listens): to
    partition peers apart (`Network.partition`), give each its own transport and host address.
    """

    class Network:
        """The hosts and listeners of in-memory transports, and the partitions between them."""

        def __init__(self) -> None:
            self.listeners: dict[tuple[str, int], tuple[StreamHandler, asyncio.AbstractEventLoop]] = {}
            self.ports = itertools.count(10000)
            self.lock = threading.Lock()
            self.sides: dict[str, int] = {}  # host -> its side of the partition; empty when whole
            self.holding: set[_MemoryWriter] = set()  # writers holding bytes until the heal

        def partition(self, *groups: Iterable[str]) -> None:
            """Cut the network: hosts (as given to listen and dial) in different groups cannot reach
            each other; hosts in no group form one more group together. So `partition({"10.0.0.3"})`
            cuts 10.0.0.3 off from everyone else.

            Across the cut, as if every packet were dropped: a new dial waits, and connects if the
            partition has healed by one of its resent SYNs (1 s, 3 s, 7 s... after the dial began)
            within the dial's timeout, else raises PeerUnreachableError at the timeout; bytes written
            on open streams are held, and delivered in order at TCP's next resend after the heal.
            Nothing fails early: peers find out only through their own timeouts.
            """
            with self.lock:
                self.sides = {host: side for side, group in enumerate(groups, 1) for host in group}

        def heal(self) -> None:
            """Make the network whole again; what was held is delivered at each stream's next resend."""
            with self.lock:
                self.sides = {}
                holding, self.holding = self.holding, set()
            now = time.monotonic()
            for writer in holding:
                if not writer._peer_loop.is_closed():
                    delay = _next_resend(writer.held_since, now) - now
                    writer._peer_loop.call_soon_threadsafe(writer._peer_loop.call_later, delay, writer.flush)

        def is_cut(self, host_a: str, host_b: str) -> bool:
            """Whether a partition separates the two hosts now."""
            sides = self.sides
            return bool(sides) and sides.get(host_a, 0) != sides.get(host_b, 0)

    def __init__(self, network: MemoryTransport.Network):
        self.network = network
        self.local_host: str | None = None  # where our dials come from: the host of our first listener

    async def listen(self, host: str, port: int, handler: StreamHandler) -> Listener:
        network = self.network
        with network.lock:
            port = port or next(network.ports)
            if (host, port) in network.listeners:
                raise OSError(f"address {host}:{port} is already in use in this memory network")
            network.listeners[(host, port)] = (handler, asyncio.get_running_loop())
        if self.local_host is None:
            self.local_host = host

        class _MemoryListener(Listener):
            @property
            def bound(self) -> list[tuple[str, int]]:
                return [(host, port)]

            async def aclose(self) -> None:
                with network.lock:
                    network.listeners.pop((host, port), None)

        return _MemoryListener()

    async def dial(self, host: str, port: int, timeout: float) -> ByteStream:
        """Raises PeerUnreachableError: nobody listens there (at once), or a partition lies in
        between and does not heal within `timeout` seconds."""
        network, our_host = self.network, self.local_host or "127.0.0.1"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        syn_at, resend = loop.time(), _SYN_RESEND_S
        while network.is_cut(our_host, host):  # this SYN is dropped: wait for the next one
            syn_at, resend = syn_at + resend, 2 * resend
            if syn_at >= deadline:
                await asyncio.sleep(deadline - loop.time())
                raise PeerUnreachableError(f"cannot connect to {host}:{port}: timed out after {timeout:g} s")
            await asyncio.sleep(syn_at - loop.time())
        with network.lock:
            entry = network.listeners.get((host, port)) or network.listeners.get(("0.0.0.0", port))
        if entry is None:
            raise PeerUnreachableError(f"cannot connect to {host}:{port}: connection refused")
        handler, their_loop = entry
        our_reader = asyncio.StreamReader(loop=loop)
        their_reader = asyncio.StreamReader(loop=their_loop)
        ours = _MemoryByteStream(our_reader, _MemoryWriter(their_reader, their_loop, network, (our_host, host)), host)
        theirs = _MemoryByteStream(
            their_reader, _MemoryWriter(our_reader, loop, network, (host, our_host)), "127.0.0.1"
        )
        ours.other, theirs.other = theirs, ours
        asyncio.run_coroutine_threadsafe(handler(theirs), their_loop)
        return ours
