"""The transport seam: byte streams between hosts, over TCP or in memory.

Everything above this module (framing, handshake, RPC, the DHT) sees only `ByteStream`,
`Listener` and `Transport`. `TCPTransport` (in `tcp.py`) is what peers use; `MemoryTransport` runs the same
logic with no sockets, for tests and for simulating thousands of nodes in one process.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

from hivecli._exceptions import PeerUnreachableError


class ByteStream(ABC):
    """A reliable, ordered, bidirectional byte stream."""

    remote_host: str  # the address we see the other end connect from (or to)

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


class _MemoryWriter:
    """The writing half of an in-memory pipe: feeds the peer's StreamReader on the peer's loop."""

    def __init__(self, peer_reader: asyncio.StreamReader, peer_loop: asyncio.AbstractEventLoop):
        self._peer_reader, self._peer_loop = peer_reader, peer_loop
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

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise ConnectionResetError("in-memory stream is closed")
        self._deliver(self._peer_reader.feed_data, bytes(data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._deliver(self._peer_reader.feed_eof)


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
        self._writer.close()
        if self.other is not None:  # closing a socket ends both directions
            self.other._writer.close()

    def is_closing(self) -> bool:
        return self._writer.closed


class MemoryTransport(Transport):
    """Streams between transports that share one `MemoryTransport.Network`; no sockets involved.

    Addresses are ordinary host:port pairs inside the network; binding port 0 picks a free one.
    Hosts may run on different event loops (threads): bytes are handed over on the owner's loop.
    """

    class Network:
        def __init__(self) -> None:
            self.listeners: dict[tuple[str, int], tuple[StreamHandler, asyncio.AbstractEventLoop]] = {}
            self.ports = itertools.count(10000)
            self.lock = threading.Lock()

    def __init__(self, network: MemoryTransport.Network):
        self.network = network

    async def listen(self, host: str, port: int, handler: StreamHandler) -> Listener:
        network = self.network
        with network.lock:
            port = port or next(network.ports)
            if (host, port) in network.listeners:
                raise OSError(f"address {host}:{port} is already in use in this memory network")
            network.listeners[(host, port)] = (handler, asyncio.get_running_loop())

        class _MemoryListener(Listener):
            @property
            def bound(self) -> list[tuple[str, int]]:
                return [(host, port)]

            async def aclose(self) -> None:
                with network.lock:
                    network.listeners.pop((host, port), None)

        return _MemoryListener()

    async def dial(self, host: str, port: int, timeout: float) -> ByteStream:
        with self.network.lock:
            entry = self.network.listeners.get((host, port)) or self.network.listeners.get(("0.0.0.0", port))
        if entry is None:
            raise PeerUnreachableError(f"cannot connect to {host}:{port}: connection refused")
        handler, their_loop = entry
        our_loop = asyncio.get_running_loop()
        our_reader = asyncio.StreamReader(loop=our_loop)
        their_reader = asyncio.StreamReader(loop=their_loop)
        ours = _MemoryByteStream(our_reader, _MemoryWriter(their_reader, their_loop), host)
        theirs = _MemoryByteStream(their_reader, _MemoryWriter(our_reader, our_loop), "127.0.0.1")
        ours.other, theirs.other = theirs, ours
        asyncio.run_coroutine_threadsafe(handler(theirs), their_loop)
        return ours
