"""A transparent TCP proxy that delays every byte: netlab's stand-in for netem, which this kernel may lack.

    python -m hivecli.netlab.proxy --port P --delay-ms D --mark M

run inside a network namespace whose outgoing TCP connections iptables redirects to port P
(`iptables -t nat -A OUTPUT -p tcp ! -d 127.0.0.0/8 -m mark ! --mark M -j REDIRECT --to-ports P`;
`NetLab.set_delay` does both). For each connection the proxy reads the original destination
(SO_ORIGINAL_DST), dials it from a socket marked M (so that the rule does not redirect it again)
and forwards both directions, holding every chunk until D/2 ms after it arrived: a round trip
through the proxy takes D ms more. Each direction is a queue of timestamped chunks bounded in
bytes, so a slow receiver slows the sender down instead of filling memory; throughput is kept
with 256 KiB reads and TCP_NODELAY on both sockets.

An end of stream is passed on after the data before it (a half-close stays a half-close); a reset
or a failed dial aborts both sides. It prints one JSON line when it listens
(`{"event": "listening", "host": ..., "port": ...}`, so that `--port 0` can be used), nothing per
connection, one line per unexpected error on stderr, and exits with status 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import socket
import struct
import sys
import time
from collections.abc import Coroutine
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; not exported by the socket module
CHUNK = 256 * 1024  # bytes per read: large reads keep the per-chunk overhead small at Gbit/s
QUEUE_LIMIT = 4 * 1024 * 1024  # bytes held per direction: 1.3 Gbit/s at 50 ms RTT before backpressure
# transport buffer before drain() waits: under asyncio's default 64 KiB, every 256 KiB write stalls
WRITE_HIGH_WATER = 1024 * 1024
# errors that are the network's doing: the endpoints see them as they would without a proxy
NETWORK_ERRORS = (OSError, asyncio.IncompleteReadError, EOFError)


def original_destination(sock: Any) -> tuple[str, int]:
    """The (host, port) a redirected connection was dialled to, before iptables REDIRECT changed it.

    Raises:
        OSError: `sock` has no NAT record (it was not redirected) or is not IPv4.
    """
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # a struct sockaddr_in
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class _DelayLine:
    """One direction of a connection: chunks held until `delay` seconds after they arrived."""

    def __init__(self, delay: float, limit: int = QUEUE_LIMIT) -> None:
        self.delay, self.limit = delay, limit
        self._chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self._size = 0
        self._changed = asyncio.Condition()

    async def receive_from(self, reader: asyncio.StreamReader) -> None:
        """Queue what `reader` delivers until its end of stream (queued as b""); waits while the queue is full.

        Raises:
            OSError: the connection failed (e.g. reset).
        """
        while True:
            data = await reader.read(CHUNK)
            # stamped on arrival, not once the queue has room; time.monotonic(), not loop.time(),
            # which uvloop caches per loop iteration and rounds to milliseconds
            due = time.monotonic() + self.delay
            async with self._changed:
                await self._changed.wait_for(lambda: self._size < self.limit)
                self._chunks.append((due, data))
                self._size += len(data)
                self._changed.notify_all()
            if not data:
                return

    async def send_to(self, writer: asyncio.StreamWriter) -> None:
        """Write each queued chunk to `writer` once it is due; at the end of stream, half-close `writer`.

        Raises:
            OSError: the connection failed (e.g. the peer reset it).
        """
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._chunks))
                due, data = self._chunks.popleft()
                self._size -= len(data)
                self._changed.notify_all()
            # a loop, because a timer may fire a little early (uvloop's have millisecond resolution);
            # the delay is a lower bound that tests rely on
            while (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                return
            writer.write(data)
            await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, so that the endpoint sees a failure rather than a clean end of stream."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None and not writer.transport.is_closing():
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, ValueError):
        pass  # closed meanwhile (uvloop raises ValueError for its closed socket): nothing left to reset
    writer.transport.abort()


class DelayProxy:
    """Accepts redirected connections on (host, port) and relays them to their original destinations."""

    def __init__(
        self, rtt_ms: float, mark: int, host: str = "127.0.0.1", port: int = 0, buffer: int | None = None
    ) -> None:
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms = {rtt_ms}: must be >= 0")
        self.one_way = rtt_ms / 2000
        # bytes held per direction, in the delay line and in each socket's kernel buffer (None:
        # QUEUE_LIMIT and the kernel's own sizes): what a real path holds is its rate x its delay,
        # and a proxy that holds far more acknowledges a sender's bytes long before they cross
        # the link, so that its TCP never sees the link's pace
        self.buffer = buffer
        self.queue_limit = buffer or QUEUE_LIMIT
        self.write_high_water = min(WRITE_HIGH_WATER, buffer or WRITE_HIGH_WATER)
        self.mark, self.host, self.port = mark, host, port
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"DelayProxy(rtt_ms={self.one_way * 2000:g}, mark={self.mark:#x}, {self.host}:{self.port}, "
            f"connections={len(self._handlers)})"
        )

    async def start(self) -> None:
        """Listen; `self.port` is the bound port afterwards.

        Raises:
            OSError: the address is in use or cannot be bound.
        """
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=CHUNK, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and abort every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _dial(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to (host, port) from a socket that carries our mark, so that it is not redirected.

        Raises:
            OSError: the dial failed (refused, unreachable, timed out).
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
        except BaseException:
            sock.close()
            raise
        self._bound(sock, socket.SO_SNDBUF)
        writer.transport.set_write_buffer_limits(high=self.write_high_water)
        return reader, writer

    def _bound(self, sock: socket.socket, option: int) -> None:
        """Cap the kernel's send or receive buffer (`option`) of `sock` at `self.buffer`, if set."""
        if self.buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, option, self.buffer)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]  # always inside a task here
        upstream: asyncio.StreamWriter | None = None
        failed = False
        try:
            sock = client_writer.get_extra_info("socket")
            try:
                host, port = original_destination(sock)
            except OSError as e:
                print(f"netlab proxy: no original destination for a connection ({e}); closing it", file=sys.stderr)
                return
            if (host, port) == tuple(sock.getsockname()[:2]):
                return  # dialled to the proxy itself, not redirected: relaying would loop
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._bound(sock, socket.SO_RCVBUF)
            client_writer.transport.set_write_buffer_limits(high=self.write_high_water)
            to_server, to_client = (_DelayLine(self.one_way, self.queue_limit) for _ in range(2))

            async def server_side() -> None:
                nonlocal upstream
                # the client's first bytes queue up (and age) in `to_server` while this dials
                server_reader, upstream = await self._dial(host, port)
                await _run_all([to_server.send_to(upstream), to_client.receive_from(server_reader)])

            await _run_all([to_client.send_to(client_writer), to_server.receive_from(client_reader), server_side()])
        except NETWORK_ERRORS:
            failed = True  # refused, reset, unreachable: the endpoints learn it from the reset below
        except asyncio.CancelledError:
            # stop() cancels us; ending normally instead of re-raising is deliberate: Python 3.11's
            # start_server calls task.exception() on its handler tasks, which raises for a cancelled one
            failed = True
        except Exception as e:  # a bug here must not take the other connections down
            failed = True
            print(f"netlab proxy: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            for writer in (client_writer, upstream):
                if writer is None:
                    continue
                if failed:
                    _reset(writer)
                else:
                    writer.close()
            self._handlers.discard(asyncio.current_task())  # type: ignore[arg-type]


async def _run_all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run the coroutines together until all return; the first to raise cancels the others and is re-raised.

    Raises:
        Exception: whatever the first failing coroutine raised.
    """
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # no-op for the finished ones; on our own cancellation, stops them all
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


async def serve(rtt_ms: float, mark: int, host: str, port: int, buffer: int | None = None) -> None:
    """Run a DelayProxy until SIGTERM or SIGINT.

    Raises:
        OSError: the listening address could not be bound.
    """
    proxy = DelayProxy(rtt_ms, mark, host, port, buffer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await proxy.start()
    print(json.dumps({"event": "listening", "host": proxy.host, "port": proxy.port}), flush=True)
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Delaying transparent TCP proxy (see hivecli.netlab).")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any; printed when listening)")
    parser.add_argument("--delay-ms", type=float, required=True, help="round-trip time added to each connection")
    parser.add_argument("--mark", type=lambda s: int(s, 0), required=True, help="SO_MARK of outgoing connections")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--buffer",
        type=int,
        default=None,
        help="bytes held per direction in the queue, the writer and each socket (default: a 4 MiB queue, "
        "a 1 MiB writer, the kernel's socket buffers)",
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error(f"--delay-ms {args.delay_ms}: must be >= 0")
    if args.buffer is not None and args.buffer < 65536:
        parser.error(f"--buffer {args.buffer}: must be at least 65536 bytes")
    from hivecli.utils.loops import new_event_loop  # uvloop where installed: half the per-chunk cost

    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.delay_ms, args.mark, args.host, args.port, args.buffer))
    except OSError as e:
        print(f"netlab proxy: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
