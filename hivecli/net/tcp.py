"""TCP byte streams that can receive straight into a caller's buffer.

asyncio's StreamReader copies every byte three times (event loop buffer, reader buffer, the
`bytes` it returns). That is fine for RPC headers but costs more than the wire itself for
tensors: 200 MB of parameters would be copied 600 MB extra per round. `_TCPStream` is a
`BufferedProtocol`: small reads land in its own buffer, and `read_into(view)` hands the
kernel the caller's memory (a tensor's bytes) so the payload is copied exactly once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import sys
from collections.abc import Callable

from hivecli._exceptions import PeerUnreachableError, ResourceExhaustedError
from hivecli.net.transport import ByteStream, Listener, SendStats, StreamHandler, Transport, same_host_socket

# Every connection starts with a small receive buffer: a node holds thousands of mostly idle
# connections (and strangers that never finish the handshake), so an idle one must cost little.
# The buffer grows only while a read waits for more bytes than it holds, and only as those bytes
# arrive; it is dropped back to this size once everything in it has been read.
_INITIAL_BUFFER_BYTES = 16 * 1024
_PIECE_BYTES = 256 * 1024  # a large read_exactly receives its bytes in pieces of at most this size
# Writes are handed to the kernel without copying. Everything queued, here and in the kernel,
# is ahead of the next message: a control message (an all-reduce's "ready", an audit) written
# behind megabytes of tensor chunks waits for them, which on a 100 Mbit/s link left the other
# direction idle for most of a second per round. So `drain` waits above 64 KiB queued here (the
# connection queues a chunk only once it has drained: connection.py), and the kernel holds at
# most _NOTSENT_LOWAT unsent bytes (TCP_NOTSENT_LOWAT; what is in flight is not limited, so the
# link stays full). Loopback speed is the same with 64 KiB as with 1 MiB (2 x 50M: 141-177
# against 146-178 ms, docs/benchmarks.md), and 1 MiB beat 4 MiB without the kernel limit.
_WRITE_HIGH_WATER = 64 * 1024
_NOTSENT_LOWAT = 128 * 1024
# A closed transport keeps its unsent bytes until the peer reads them; one that never reads
# would keep them (and the socket) forever. So `close` drops them at once above the high-water
# mark (the peer is not keeping up, and the connection is going away anyway), and gives up on
# what is left below it after a grace period.
_CLOSE_FLUSH_SECONDS = 5.0
# Linux's SO_MAX_PACING_RATE (Python's socket module names it only from 3.13 on, and not everywhere)
_SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
# struct tcp_info (linux/tcp.h, append-only): tcpi_bytes_acked is the u64 at offset 120 (Linux
# 4.1), tcpi_notsent_bytes the u32 at 144 (4.6), tcpi_bytes_retrans the u64 at 208 (4.19); an
# older kernel returns fewer bytes
_TCP_INFO_BYTES = 232
_BYTES_ACKED_AT, _NOTSENT_AT, _BYTES_RETRANS_AT = 120, 144, 208


class _TCPStream(asyncio.BufferedProtocol, ByteStream):
    def __init__(self, on_ready: Callable[[_TCPStream], None] | None = None):
        self.remote_host = "?"
        self._on_ready = on_ready
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = bytearray(_INITIAL_BUFFER_BYTES)
        self._start = self._end = 0  # unread bytes are _buffer[_start:_end]
        self._target: memoryview | None = None  # read_into's destination, filled by the kernel
        self._target_pos = 0
        self._wanted = 0  # bytes the waiting read_exactly needs buffered; 0 when none waits
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused_reading = self._paused_writing = False
        self._eof = False
        self._lost: Exception | None = None
        self.bytes_received = 0  # every byte that arrived, read or not

    # ---- protocol callbacks (the event loop calls these) -----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        self._loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.remote_host = peer[0] if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            self.same_host = same_host_socket(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(socket, "TCP_NOTSENT_LOWAT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT)
        if self._on_ready is not None:
            self._on_ready(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._target_pos :]
        if self._end == len(self._buffer):
            self._make_room()
        return memoryview(self._buffer)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        if self._target is not None:
            self._target_pos += nbytes
            if self._target_pos == len(self._target):
                self._target = None
                self._wake()
            return
        self._end += nbytes
        unread = self._end - self._start
        if self._wanted and unread >= self._wanted:
            self._wake()
        # Full of unread bytes, and no read waits for more: stop reading until the reader takes
        # some (`_consumed` resumes). Growing instead would let a peer that sends faster than
        # we consume fill our memory.
        if unread == len(self._buffer) and unread >= self._wanted and not self._paused_reading:
            self._paused_reading = True
            self._transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("connection lost")
        self._eof = True
        if self._start == self._end:  # nothing left to read: the buffer is garbage now
            self._buffer = bytearray()
            self._start = self._end = 0
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            # a result, not an exception: if every waiter was cancelled, nobody would retrieve it
            # and asyncio would log "Future exception was never retrieved"; drain() checks _lost
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # ---- ByteStream ------------------------------------------------------------------------

    async def read_exactly(self, n: int) -> bytes:
        """Read exactly n bytes. Raises asyncio.IncompleteReadError at end of stream.

        A frame's declared length is the peer's word, not bytes on the wire: the buffer grows
        (in `_make_room`), or a large read's pieces are allocated (`_read_in_pieces`), only as
        bytes arrive, so asking for 64 MiB costs nothing until they do.
        """
        if n - (self._end - self._start) > _PIECE_BYTES:
            return await self._read_in_pieces(n)
        try:
            while self._end - self._start < n:
                if self._eof:
                    partial = bytes(self._buffer[self._start : self._end])
                    self._consumed(self._end - self._start)
                    raise asyncio.IncompleteReadError(partial, n)
                self._wanted = n
                if self._paused_reading:  # paused on a full buffer; now a read needs more room
                    self._paused_reading = False
                    self._transport.resume_reading()  # type: ignore[union-attr]
                await self._wait()
        finally:
            self._wanted = 0
        data = bytes(memoryview(self._buffer)[self._start : self._start + n])  # one copy, not two via a slice
        self._consumed(n)
        return data

    async def _read_in_pieces(self, n: int) -> bytes:
        """read_exactly of a large read, most of which has not arrived: what the buffer holds, then
        pieces the kernel fills directly, joined (one copy). Growing the buffer instead copied
        what it held at each doubling from 16 KiB, then twice more on the way out. A piece is
        allocated once the one before it is full, and at most as large as what arrived so far
        (at least 16 KiB): memory stays within twice the bytes that arrived, as the buffer's."""
        have = self._end - self._start
        pieces: list[bytes | bytearray] = [bytes(memoryview(self._buffer)[self._start : self._end])]
        self._consumed(have)
        remaining = n - have
        while remaining:
            piece = bytearray(min(remaining, _PIECE_BYTES, max(_INITIAL_BUFFER_BYTES, n - remaining)))
            try:
                await self.read_into(memoryview(piece))
            except asyncio.IncompleteReadError as e:
                raise asyncio.IncompleteReadError(b"".join(pieces) + e.partial, n) from None
            pieces.append(piece)
            remaining -= len(piece)
        return b"".join(pieces)

    async def read_into(self, view: memoryview) -> None:
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        have = min(self._end - self._start, len(view))
        view[:have] = memoryview(self._buffer)[self._start : self._start + have]
        self._consumed(have)
        if have == len(view):
            return
        if self._eof:
            raise asyncio.IncompleteReadError(bytes(view[:have]), len(view))
        self._target, self._target_pos = view, have
        try:
            while self._target is not None:
                if self._eof:
                    raise asyncio.IncompleteReadError(bytes(view[: self._target_pos]), len(view))
                await self._wait()
        finally:
            self._target = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("connection is closed")
        self._transport.write(data)

    def write_buffer_size(self) -> int:
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    async def drain(self) -> None:
        if self._lost is not None:
            raise ConnectionResetError("connection lost")
        if self._paused_writing:  # several tasks may wait at once: they share one future
            if self._drain_waiter is None or self._drain_waiter.done():
                self._drain_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drain_waiter)
            if self._lost is not None:
                raise ConnectionResetError("connection lost")

    def close(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        queued = transport.get_write_buffer_size()
        if queued > _WRITE_HIGH_WATER:
            transport.abort()
            return
        transport.close()  # sends what is queued first (a GOAWAY, say), then closes
        if queued and self._loop is not None:
            self._loop.call_later(_CLOSE_FLUSH_SECONDS, transport.abort)

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def set_max_rate(self, bytes_per_second: float | None) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing() or sys.platform != "linux":
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        # the kernel reads an unsigned 32-bit rate (bytes/s) where ~0 means no limit
        rate = -1 if bytes_per_second is None else max(1, min(int(bytes_per_second), 2**31 - 1))
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, rate)
        except (OSError, ValueError):  # closed under us (uvloop's socket: "negative file descriptor")
            return False
        return True

    def send_stats(self) -> SendStats | None:
        transport = self._transport
        sock = None if transport is None or transport.is_closing() else transport.get_extra_info("socket")
        if sock is None or sys.platform != "linux":
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        except (OSError, ValueError):  # closed under us
            return None
        if len(info) < _BYTES_RETRANS_AT + 8:
            return None  # a kernel older than 4.19
        (acked,) = struct.unpack_from("=Q", info, _BYTES_ACKED_AT)
        (notsent,) = struct.unpack_from("=I", info, _NOTSENT_AT)
        (retransmitted,) = struct.unpack_from("=Q", info, _BYTES_RETRANS_AT)
        return SendStats(acked, retransmitted, notsent + transport.get_write_buffer_size())

    def detach(self) -> socket.socket | None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._start != self._end:
            return None  # gone, or bytes were read ahead that the new owner would never see
        inner = transport.get_extra_info("socket")
        if inner is None:
            return None
        sock = socket.socket(fileno=os.dup(inner.fileno()))  # the loop closes its own descriptor
        transport.abort()  # unregisters the descriptor from the loop's poller and closes it
        sock.setblocking(True)
        return sock

    # ---- internals -------------------------------------------------------------------------

    def _consumed(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buffer) > _INITIAL_BUFFER_BYTES or (self._lost is not None and self._buffer):
                # Empty: give back what a large read grew (a new buffer, never a resize: a
                # memoryview the loop took may still be alive, and resizing would raise).
                self._buffer = bytearray(_INITIAL_BUFFER_BYTES if self._lost is None else 0)
        if self._paused_reading and self._end - self._start < len(self._buffer):
            self._paused_reading = False  # there is room again (`get_buffer` compacts)
            self._transport.resume_reading()  # type: ignore[union-attr]

    def _make_room(self) -> None:
        """Free space at the end of a full buffer: move unread bytes to the front, or, when a
        read waits for more than the buffer holds, double it (never past what that read needs).
        Growth is driven by bytes that arrived, so memory stays within twice the unread bytes."""
        unread = self._end - self._start
        size = len(self._buffer)
        if self._wanted > size:
            size = min(max(2 * size, _INITIAL_BUFFER_BYTES), self._wanted)
        elif self._start == 0:  # reading should be paused; room for one more recv, just in case
            size += _INITIAL_BUFFER_BYTES
        # view to view: one memmove (safe where they overlap); a bytearray's slice assignment
        # would copy its source to a temporary first
        unread_bytes = memoryview(self._buffer)[self._start : self._end]
        if size != len(self._buffer):
            self._buffer = bytearray(size)  # a new buffer, never a resize (see `_consumed`)
        memoryview(self._buffer)[:unread] = unread_bytes
        unread_bytes.release()
        self._start, self._end = 0, unread

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _TCPListener(Listener):
    def __init__(self, server: asyncio.Server, tasks: set[asyncio.Task[None]]):
        self._server, self._tasks = server, tasks

    @property
    def bound(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    async def aclose(self) -> None:
        self._server.close()
        await self._server.wait_closed()


class TCPTransport(Transport):
    async def listen(self, host: str, port: int, handler: StreamHandler) -> Listener:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        def on_ready(stream: _TCPStream) -> None:
            task = loop.create_task(handler(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        server = await loop.create_server(lambda: _TCPStream(on_ready), host, port, reuse_address=True)
        return _TCPListener(server, tasks)

    async def dial(self, host: str, port: int, timeout: float) -> ByteStream:
        loop = asyncio.get_running_loop()
        try:
            _, stream = await asyncio.wait_for(loop.create_connection(_TCPStream, host, port), timeout)
        except asyncio.TimeoutError:
            raise PeerUnreachableError(f"connecting to {host}:{port} timed out after {timeout:g} s") from None
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise ResourceExhaustedError(
                    f"cannot connect to {host}:{port}: this process is out of file descriptors; "
                    f"raise the limit (ulimit -n) or run fewer nodes per process"
                ) from None
            reason = os.strerror(e.errno).lower() if e.errno else str(e) or type(e).__name__
            raise PeerUnreachableError(f"cannot connect to {host}:{port}: {reason}") from None
        stream.remote_host = host
        return stream
