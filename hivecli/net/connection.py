"""One authenticated connection to a peer, multiplexing any number of RPC streams.

Every frame header is a msgpack list `[kind, stream_id, ...]`:

    REQUEST  [0, id, method, payload] + body   opens stream `id` and calls `method`
    DATA     [1, id, payload] + body           one message on an open stream
    END      [2, id]                           the sender will send no more on `id`
    ERROR    [3, id, message]                  the stream failed; ends it both ways
    CANCEL   [4, id]                           the caller gave up; the handler is cancelled
    RESPONSE [5, id, payload] + body           DATA and END in one frame: a unary reply, or
                                               a stream's last message (Stream.send_last)
    GOAWAY   [6, 0, reason]                    the sender is closing the connection, and why

The dialer numbers its streams even, the acceptor odd, so both can open streams at once.
A peer that sends an oversized or malformed frame gets a GOAWAY naming the problem and is
disconnected; the node keeps serving everyone else. So does one that breaks a limit of
`NetSettings`: it sends requests too fast for too long, or leaves its replies unread. A request
over the rate or concurrency limit is refused on its own with an ERROR. Each such event is
logged as one line, at most one per kind every few seconds, never with a traceback. The limit
machinery itself (`RequestBudget`, `LimitLog`) lives in hivecli.net.limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

from hivecli._exceptions import (
    ConnectionClosedError,
    HiveError,
    MalformedFrameError,
    ProtocolError,
    RemoteError,
    RPCTimeoutError,
)
from hivecli.net.framing import FrameLimits, describe, encode_frame, read_header
from hivecli.net.identity import PeerID
from hivecli.net.limits import REFUSAL_WINDOW as REFUSAL_WINDOW  # re-exported: it lived here
from hivecli.net.limits import Disconnect, LimitLog, RequestBudget
from hivecli.net.multiaddr import Multiaddr
from hivecli.net.relay import RelaySettings
from hivecli.net.secure import SecuritySettings
from hivecli.net.transport import ByteStream, SendStats
from hivecli.utils.loops import timeout as _timeout

logger = logging.getLogger(__name__)
_COALESCE_BYTES = 64 * 1024
# A frame without a body (a control message: a reducer's "ready", an audit, a DHT reply) is
# written at once, ahead of every frame with a body not yet handed to the transport; it waits
# for the transport to drain only past this many queued bytes (a peer that does not read).
_SMALL_FRAME_BACKLOG = 4 * 1024 * 1024
_MAX_ERROR_TEXT = 2000  # characters of a peer's ERROR or GOAWAY text we keep: it is the peer's word


class Kind(IntEnum):
    REQUEST = 0
    DATA = 1
    END = 2
    ERROR = 3
    CANCEL = 4
    RESPONSE = 5
    GOAWAY = 6


class Message(NamedTuple):
    payload: Any
    body: bytes | memoryview = b""  # a memoryview when a `Stream.body_sink` placed it


BodySink = Callable[[Any, int], "memoryview | None"]
_Delivery = tuple[Kind, Any, "bytes | memoryview"]


@dataclass(frozen=True)
class NetSettings:
    """Timeouts and limits of the networking layer.

    Attributes:
        connect_timeout: seconds to open a TCP connection (default 5).
        handshake_timeout: seconds for the identity handshake after connecting (default 5).
        request_timeout: default seconds to wait for a unary RPC's response (default 10).
        idle_timeout: close connections with no traffic for this long (default 300).
        stream_queue_size: messages buffered per stream before the connection's reader waits
            for the consumer (default 64); this is what keeps a fast sender from filling memory.
        limits: per-frame size limits, checked before allocation.
        max_pending_handshakes: inbound connections that may be mid-handshake at once (default
            256); beyond it a new inbound socket is closed at once.
        max_connections: open authenticated connections (default None: min(1024, the soft
            RLIMIT_NOFILE - 64), computed when the Host is created). At the cap, the least
            recently active connection without open streams is closed to admit a new one; if
            every connection is busy, the new one is refused.
        max_connections_per_peer: open connections to one peer ID (default 4), the same way.
        max_queued_bytes: bytes queued for sending on one connection (default 32 MiB) beyond
            which a reply written by the read loop (which cannot wait for the peer to read)
            closes the connection instead. An allreduce legitimately queues ~2 tensor chunks
            plus the 1 MiB write high-water mark.
        max_requests_per_second: requests a peer may make per connection, sustained (default
            500); a request over the rate gets an ERROR "rate limit exceeded".
        request_burst: requests a peer may make at once above that rate (default 1000). A peer
            refused 2 x request_burst times within 10 s is disconnected, however it spaces them.
        max_concurrent_requests: handler tasks running at once for one connection (default
            256); a request beyond it gets an ERROR "too many concurrent requests".
        max_offences_per_host: connections from one IP address dropped for breaking a limit
            (flooding requests, leaving replies unread) within a minute, after which new
            connections from that address are refused until the minute has passed (default 3;
            0: never). A flooder with fresh identities cannot come back at once, each time with
            a fresh allowance, and keep the node's loop busy refusing it.
        security: encryption and the swarm key (hivecli.net.secure.SecuritySettings; default:
            encrypted, public swarm).
        relay: whether we relay for unreachable peers and use relays when unreachable, and the
            caps on what we relay (hivecli.net.relay.RelaySettings).
    """

    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    request_timeout: float = 10.0
    idle_timeout: float = 300.0
    stream_queue_size: int = 64
    limits: FrameLimits = field(default_factory=FrameLimits)
    max_pending_handshakes: int = 256
    max_connections: int | None = None
    max_connections_per_peer: int = 4
    max_queued_bytes: int = 32 * 1024 * 1024
    max_requests_per_second: float = 500.0
    request_burst: int = 1000
    max_concurrent_requests: int = 256
    max_offences_per_host: int = 3
    security: SecuritySettings = field(default_factory=SecuritySettings)
    relay: RelaySettings = field(default_factory=RelaySettings)


_limit_log = LimitLog(logger)  # for connections made without a Host


class EndOfStream(Exception):
    """Raised by `Stream.recv` once the other side has ended the stream."""


class Stream:
    """One multiplexed exchange with a peer; both the caller and the handler hold one.

    Use `send()` any number of times, `end()` when done sending, and `recv()` (or `async for`)
    to read what the other side sends until it ends.
    """

    def __init__(self, connection: Connection, stream_id: int, method: str):
        self.connection = connection
        self.stream_id = stream_id
        self.method = method
        self._inbox: asyncio.Queue[_Delivery] = asyncio.Queue(connection.settings.stream_queue_size)
        self._remote_done = False
        self._local_done = False
        # Where DATA bodies go: called in the read loop with (payload, body_len); a memoryview of
        # exactly body_len bytes receives the body in place (no copy), None means plain bytes.
        self.body_sink: BodySink | None = None

    @property
    def remote_peer(self) -> PeerID:
        return self.connection.remote_peer

    async def send(self, payload: Any, body: bytes | bytearray | memoryview = b"") -> None:
        """Send one message.

        Raises:
            HiveError: this side of the stream has ended (end, send_last or cancel).
            ConnectionClosedError: the connection is gone.
        """
        if self._local_done:
            raise HiveError(f"{self.method}: this side of the stream has already ended")
        await self.connection._send_frame([Kind.DATA, self.stream_id, payload], body)

    async def send_last(self, payload: Any, body: bytes | bytearray | memoryview = b"") -> None:
        """Send one message and end our side, in one frame (RESPONSE: DATA and END): a message
        that nothing follows costs one frame instead of two. The other side's `recv` returns it,
        then raises EndOfStream.

        Raises:
            HiveError: this side of the stream has ended already.
            ConnectionClosedError: the connection is gone.
        """
        if self._local_done:
            raise HiveError(f"{self.method}: this side of the stream has already ended")
        self._local_done = True
        await self.connection._send_frame([Kind.RESPONSE, self.stream_id, payload], body)
        self._maybe_forget()

    async def end(self) -> None:
        """Tell the other side we will send nothing more (it can still send to us)."""
        if not self._local_done:
            self._local_done = True
            await self.connection._send_frame([Kind.END, self.stream_id])
            self._maybe_forget()

    async def recv(self, timeout: float | None = None) -> Message:
        """Wait for the next message.

        Raises:
            EndOfStream: the other side ended the stream.
            RemoteError: the other side reported an error.
            RPCTimeoutError: nothing arrived within `timeout` seconds.
            ConnectionClosedError: the connection closed first.
        """
        if self._remote_done and self._inbox.empty():
            raise EndOfStream()
        try:
            if not self._inbox.empty():
                kind, payload, body = self._inbox.get_nowait()
            else:
                async with _timeout(timeout):
                    kind, payload, body = await self._inbox.get()
        except asyncio.TimeoutError:
            raise RPCTimeoutError(f"{self.method} on peer {self.remote_peer} sent nothing for {timeout:g} s") from None
        if kind == Kind.DATA:
            return Message(payload, body)
        if kind == Kind.RESPONSE:
            self._remote_done = True
            self._maybe_forget()
            return Message(payload, body)
        self._remote_done = True
        self._maybe_forget()
        if kind == Kind.END:
            raise EndOfStream()
        if kind == Kind.ERROR:
            raise RemoteError(f"{self.method} failed on peer {self.remote_peer}: {describe(payload, _MAX_ERROR_TEXT)}")
        raise ConnectionClosedError(f"connection to peer {self.remote_peer} closed: {payload}")

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except EndOfStream:
                return

    @property
    def ended_by_peer(self) -> bool:
        """Whether the other side has ended its side (END, a last message, an error)."""
        return self._remote_done

    def forget(self) -> None:
        """Drop a stream the other side has ended and needs nothing more on (its handler said
        its last word and returned): unlike `cancel`, nothing is sent. Late messages are dropped."""
        self._local_done = self._remote_done = True
        self.connection._streams.pop(self.stream_id, None)

    async def cancel(self) -> None:
        """Abandon the stream: the other side's handler is cancelled; late messages are dropped."""
        finished = self._local_done and self._remote_done
        self.forget()
        if not finished:
            await self.connection._cancel_quietly(self.stream_id)

    async def _deliver(self, kind: Kind, payload: Any, body: bytes | memoryview) -> None:
        await self._inbox.put((kind, payload, body))
        if kind != Kind.DATA:  # the other side is done (recv still hands out what is queued first):
            self._remote_done = True  # a stream we ended is forgotten now, even if nobody reads
            self._maybe_forget()  # that end (a sender that has what it needs would leak one per round)

    def _maybe_forget(self) -> None:
        if self._local_done and self._remote_done:
            self.connection._streams.pop(self.stream_id, None)


UnaryHandler = Callable[["Connection", Any, bytes], Awaitable[Any]]
InlineHandler = Callable[["Connection", Any, bytes], Any]
StreamHandlerFn = Callable[[Stream, Any, bytes], Awaitable[None]]
SinkSetup = Callable[[Stream, Any], None]


class Reply(NamedTuple):
    """Return this from a unary handler to attach a raw body to the response."""

    payload: Any
    body: bytes | bytearray | memoryview = b""


@dataclass
class Handlers:
    """Methods a host serves: unary ones return a reply; stream ones talk on a `Stream`;
    inline ones are plain functions that return at once and run without a task. A stream
    method may have a sink setup too: called with the new stream and the request's payload
    before the handler's task starts, it may set `Stream.body_sink`, so that data the peer sends
    right behind its request lands where it belongs instead of in fresh bytes (the read loop
    reads on before the task runs)."""

    unary: dict[str, UnaryHandler] = field(default_factory=dict)
    inline: dict[str, InlineHandler] = field(default_factory=dict)
    streaming: dict[str, StreamHandlerFn] = field(default_factory=dict)
    sinks: dict[str, SinkSetup] = field(default_factory=dict)


class Connection:
    """An authenticated link to `remote_peer`. Create with `Host.connect`, not directly."""

    def __init__(
        self,
        stream: ByteStream,
        remote_peer: PeerID,
        remote_maddrs: list[Multiaddr],
        handlers: Handlers,
        settings: NetSettings,
        outbound: bool,
        limit_log: LimitLog | None = None,
    ):
        self.remote_peer = remote_peer
        self.remote_maddrs = remote_maddrs
        self.remote_host = stream.remote_host
        self.relayed = stream.relayed
        self.settings = settings
        self.outbound = outbound
        self._stream = stream
        self._handlers = handlers
        self._streams: dict[int, Stream] = {}
        self._calls: dict[int, asyncio.Future[tuple[Kind, Any, bytes]]] = {}
        self._handler_tasks: dict[int, asyncio.Task[None]] = {}
        self._ids = itertools.count(0 if outbound else 1, 2)
        self._close_reason: str | None = None
        self._bulk_turn = asyncio.Lock()  # one bulk frame at a time enters the transport's queue
        self.broke_limit: str | None = None  # the kind of limit this peer was dropped for, if any
        self._limit_log = limit_log or _limit_log
        self._loop = asyncio.get_running_loop()
        self._budget = RequestBudget(settings, self._loop.time())  # what the peer may still request
        self.closed = asyncio.Event()
        self.last_activity = self._loop.time()
        self.last_received = self.last_activity  # loop time of the last frame from the peer
        self._reader = self._loop.create_task(self._read_loop())

    @property
    def is_closed(self) -> bool:
        return self._close_reason is not None

    @property
    def sealed(self) -> bool:
        """Whether this link's bytes are encrypted: not when both ends turned encryption off, nor
        between two processes on one host (SecuritySettings.encrypt_same_host)."""
        return self._stream.sealed

    @property
    def same_host(self) -> bool:
        """Whether both ends are processes of this host on a direct TCP connection."""
        return self._stream.same_host

    def silent_since(self, moment: float) -> bool:
        """Whether nothing at all has arrived from the peer since loop time `moment`: a request
        that timed out on a link that also carried nothing else points to a dead link (say, a
        TCP connection from before an outage, resending on a long backed-off timer), not to a
        slow peer on a busy machine."""
        return self.last_received <= moment

    def set_max_rate(self, bytes_per_second: float | None) -> bool:
        """Send at most `bytes_per_second` on this connection from now on (None: no limit), where
        its transport can pace itself (ByteStream.set_max_rate); True if it can. Never raises:
        a connection that closed meanwhile has nothing left to pace."""
        return self._stream.set_max_rate(bytes_per_second)

    def send_stats(self) -> SendStats | None:
        """What TCP did with this connection's bytes so far (ByteStream.send_stats), or None
        where it cannot say. Never raises."""
        return self._stream.send_stats()

    @property
    def busy(self) -> bool:
        """Whether a call, stream or handler is in progress on this connection; a host that
        needs room closes idle connections only."""
        return bool(self._streams or self._calls or self._handler_tasks)

    async def call(self, method: str, payload: Any, body: bytes = b"", timeout: float | None = None) -> Message:
        """Call a unary method and wait for its response.

        Raises:
            RPCTimeoutError: no response within `timeout` (default: settings.request_timeout).
            RemoteError: the handler raised or the method is unknown.
            ConnectionClosedError: the connection closed before the response arrived.
        """
        timeout = self.settings.request_timeout if timeout is None else timeout
        stream_id = next(self._ids)
        # a unary call waits on one future, not a stream and its queue: calls are the hot path
        response: asyncio.Future[tuple[Kind, Any, bytes]] = asyncio.get_running_loop().create_future()
        self._calls[stream_id] = response
        try:
            await self._send_frame([Kind.REQUEST, stream_id, method, payload], body)
            try:
                async with _timeout(timeout):
                    kind, result, result_body = await response
            except asyncio.TimeoutError:
                await self._cancel_quietly(stream_id)
                raise RPCTimeoutError(f"{method} on peer {self.remote_peer} sent nothing for {timeout:g} s") from None
        finally:
            self._calls.pop(stream_id, None)
        if kind == Kind.DATA:  # a streaming method answered: keep its first message, stop the rest
            await self._cancel_quietly(stream_id)
        if kind in (Kind.DATA, Kind.RESPONSE):
            return Message(result, result_body)
        if kind == Kind.ERROR:
            raise RemoteError(f"{method} failed on peer {self.remote_peer}: {describe(result, _MAX_ERROR_TEXT)}")
        if kind == Kind.END:
            raise RemoteError(f"{method} on peer {self.remote_peer} ended without a response")
        raise ConnectionClosedError(f"connection to peer {self.remote_peer} closed: {result}")

    async def _cancel_quietly(self, stream_id: int) -> None:
        if not self.is_closed:
            with contextlib.suppress(ConnectionClosedError):
                await self._send_frame([Kind.CANCEL, stream_id])

    async def open_stream(self, method: str, payload: Any, body: bytes = b"") -> Stream:
        """Open a stream to a streaming method, sending `payload` as its request."""
        stream = Stream(self, next(self._ids), method)
        self._streams[stream.stream_id] = stream
        try:
            await self._send_frame([Kind.REQUEST, stream.stream_id, method, payload], body)
        except BaseException:
            self._streams.pop(stream.stream_id, None)
            raise
        return stream

    async def _send_frame(self, header: list[Any], body: bytes | bytearray | memoryview = b"") -> None:
        """Queue one frame. Frames with a body (tensor chunks, circuit bytes) take turns, and
        each waits, before it is queued, until the transport has drained below its high-water
        mark; frames without one (control messages: a reducer's "ready", an audit, a DHT reply)
        are queued at once. So a control message waits behind at most one high-water mark and
        one chunk of bulk bytes, not behind every chunk that concurrent streams have written: on
        a 100 Mbit/s link shared by 3 connections, a reducer's "ready" took 0.3-0.4 s to arrive
        behind them.

        Raises:
            ConnectionClosedError: the connection is closed, or closed while sending.
        """
        prefix, body = encode_frame(header, body)
        try:
            if not body:
                self._write(prefix)
                if self._stream.write_buffer_size() > _SMALL_FRAME_BACKLOG:
                    await self._stream.drain()
                return
            async with self._bulk_turn:
                await self._stream.drain()
                if len(body) <= _COALESCE_BYTES:  # one syscall for a small frame instead of two
                    self._write(prefix + bytes(body))
                else:  # a tensor chunk goes to the kernel from its own memory, uncopied
                    self._write(prefix, body)
        except (ConnectionError, RuntimeError) as e:
            self.close(f"send failed: {e}")
            raise ConnectionClosedError(f"connection to peer {self.remote_peer} closed while sending") from None

    def _write(self, *parts: bytes | bytearray | memoryview) -> None:
        """Raises ConnectionClosedError if the connection is closed; ConnectionError as ByteStream.write."""
        if self._close_reason is not None:
            raise ConnectionClosedError(f"connection to peer {self.remote_peer} is closed: {self._close_reason}")
        self.last_activity = self._loop.time()
        for part in parts:
            self._stream.write(part)

    async def _read_loop(self) -> None:
        reason = "closed by the peer"
        try:
            while True:
                header, body_len = await read_header(self._stream, self.settings.limits)
                body: bytes | memoryview = b""
                if body_len:
                    target = self._body_target(header, body_len)
                    if target is not None:
                        await self._stream.read_into(target)
                        body = target
                    else:
                        body = await self._stream.read_exactly(body_len)
                self.last_activity = self.last_received = asyncio.get_running_loop().time()
                await self._dispatch(header, body)
        except ConnectionResetError as e:
            reason = str(e) or reason  # carries the peer's GOAWAY reason, if it sent one
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ProtocolError as e:
            reason = f"protocol violation: {e}"
            self._limit_log.warning("protocol", "Disconnecting peer %s (%s): %s", self.remote_peer, self.remote_host, e)
            self._send_goaway(str(e))
        except Disconnect as e:
            reason = str(e)
            self.broke_limit = e.kind
            self._limit_log.warning(e.kind, "Disconnecting peer %s (%s): %s", self.remote_peer, self.remote_host, e)
            if e.goaway:
                self._send_goaway(reason)
        except asyncio.CancelledError:
            reason = "closed by this node"
        finally:
            self.close(reason)

    def _body_target(self, header: Any, body_len: int) -> memoryview | None:
        if not (isinstance(header, list) and len(header) == 3 and header[0] == Kind.DATA):
            return None
        stream = self._streams.get(header[1]) if isinstance(header[1], int) else None
        if stream is None or stream.body_sink is None:
            return None
        try:
            target = stream.body_sink(header[2], body_len)
        except Exception:  # a payload the sink does not understand: its consumer will reject it
            return None
        return target if target is not None and target.nbytes == body_len else None

    async def _dispatch(self, header: Any, body: bytes | memoryview) -> None:
        if not isinstance(header, list) or len(header) < 2 or not all(isinstance(x, int) for x in header[:2]):
            raise MalformedFrameError(f"frame header {describe(header)} is not [kind, stream_id, ...]")
        kind, stream_id = header[0], header[1]
        if kind == Kind.REQUEST:
            if len(header) != 4 or not isinstance(header[2], str):
                raise MalformedFrameError("REQUEST frame must be [0, stream_id, method, payload]")
            if stream_id in self._streams or stream_id in self._handler_tasks:
                raise MalformedFrameError(f"REQUEST reuses open stream id {stream_id}")
            inline = self._handlers.inline.get(header[2])
            if not self._admit_request(stream_id, needs_task=inline is None):
                return
            if inline is not None:
                self._run_inline(inline, stream_id, header[2], header[3], body)
            else:
                self._start_handler(stream_id, header[2], header[3], body)
        elif kind in (Kind.DATA, Kind.RESPONSE, Kind.ERROR, Kind.END):
            expected = 2 if kind == Kind.END else 3
            if len(header) != expected:
                raise MalformedFrameError(f"{Kind(kind).name} frame must have {expected} fields")
            payload = header[2] if kind != Kind.END else None
            call = self._calls.get(stream_id)
            if call is not None:
                if not call.done():
                    call.set_result((Kind(kind), payload, body))
                return
            stream = self._streams.get(stream_id)
            if stream is not None:
                await stream._deliver(Kind(kind), payload, body)
        elif kind == Kind.CANCEL:
            task = self._handler_tasks.get(stream_id)
            if task is not None:
                task.cancel()
        elif kind == Kind.GOAWAY:
            reason = describe(header[2], _MAX_ERROR_TEXT) if len(header) > 2 else ""
            raise ConnectionResetError(f"peer closed the connection: {reason}")
        else:
            raise MalformedFrameError(f"unknown frame kind {kind}")

    def _admit_request(self, stream_id: int, needs_task: bool) -> bool:
        """Ask the peer's `RequestBudget` whether this request may run; if not (rate or
        concurrency limit), answer ERROR instead and return False. The handler never runs, so a
        flood costs one small frame per request.

        Raises:
            Disconnect: the peer keeps sending requests that are refused (see
                `RequestBudget.admit`), or leaves replies unread (see `_reply_now`).
        """
        refusal = self._budget.admit(self._loop.time(), needs_task, len(self._handler_tasks))
        if refusal is None:
            return True
        self._reply_now([Kind.ERROR, stream_id, refusal])
        return False

    def _run_inline(self, handler: InlineHandler, stream_id: int, method: str, payload: Any, body: bytes) -> None:
        """Answer a request right here in the read loop: no task, no stream object. Only for
        handlers that never wait, where a task would cost more than the handler itself.

        Raises:
            Disconnect: the peer leaves its replies unread (see `_reply_now`).
        """
        try:
            result = handler(self, payload, body)
            reply = result if isinstance(result, Reply) else Reply(result)
            frame = [Kind.RESPONSE, stream_id, reply.payload]
        except Exception as e:
            frame, reply = [Kind.ERROR, stream_id, self._describe_failure(method, e)], Reply(None)
        self._reply_now(frame, reply.body)

    def _reply_now(self, header: list[Any], body: bytes | bytearray | memoryview = b"") -> None:
        """Queue a frame from the read loop without waiting for the peer to read it.

        The read loop must never await `drain`: two peers each blocked sending to the other
        would stop reading, and so never unblock each other. Without that backpressure, a peer
        that sends requests and never reads the replies would grow our send buffer forever;
        instead, past max_queued_bytes queued for it, the connection is dropped.

        Raises:
            Disconnect: the frame would take the queued bytes past max_queued_bytes.
            ConnectionResetError: the stream is already closed.
        """
        if self._close_reason is not None:
            return
        prefix, out_body = encode_frame(header, body)
        size = len(prefix) + (out_body.nbytes if isinstance(out_body, memoryview) else len(out_body))
        queued = self._stream.write_buffer_size()
        limit = self.settings.max_queued_bytes
        if queued and queued + size > limit:  # an empty queue takes any one reply
            raise Disconnect(
                "unread replies",
                f"it does not read its replies ({queued} bytes queued for it, max_queued_bytes={limit})",
                goaway=False,  # it would not read that either
            )
        self._stream.write(prefix)  # flow control happens on our next awaited send
        if out_body:
            self._stream.write(out_body)

    def _send_goaway(self, reason: str) -> None:
        """Best effort: tell the peer why we are about to close (it may be gone already)."""
        try:
            prefix, _ = encode_frame([Kind.GOAWAY, 0, reason])
            self._stream.write(prefix)
        except Exception:
            pass

    def goaway(self, reason: str) -> None:
        """Close the connection, first telling the peer why (its calls fail with `reason`)."""
        if self._close_reason is None:
            self._send_goaway(reason)
        self.close(reason)

    def _describe_failure(self, method: str, error: Exception) -> str:
        """The one line a caller sees for a failed handler; unexpected errors are logged here."""
        if isinstance(error, HiveError):
            return str(error)
        logger.error("Handler %s failed for peer %s", method, self.remote_peer, exc_info=error)
        return f"internal error: {type(error).__name__}: {error}"

    def _start_handler(self, stream_id: int, method: str, payload: Any, body: bytes) -> None:
        unary = self._handlers.unary.get(method)
        streaming = self._handlers.streaming.get(method)
        stream = Stream(self, stream_id, method)
        self._streams[stream_id] = stream
        sink_setup = self._handlers.sinks.get(method) if streaming is not None else None
        if sink_setup is not None:
            try:
                sink_setup(stream, payload)
            except Exception:  # a setup must not fail; if it does, the body comes as bytes, as without one
                logger.exception("Sink setup of %s failed for peer %s", method, self.remote_peer)

        async def run() -> None:
            try:
                if unary is not None:
                    result = await unary(self, payload, body)
                    reply = result if isinstance(result, Reply) else Reply(result)
                    stream._local_done = True
                    await self._send_frame([Kind.RESPONSE, stream_id, reply.payload], reply.body)
                elif streaming is not None:
                    await streaming(stream, payload, body)
                    await stream.end()
                else:
                    await self._send_frame([Kind.ERROR, stream_id, f"unknown method {describe(method)!r}"])
            except asyncio.CancelledError:
                pass
            except ConnectionClosedError:
                pass
            except Exception as e:
                message = self._describe_failure(method, e)
                try:
                    await self._send_frame([Kind.ERROR, stream_id, message])
                except ConnectionClosedError:
                    pass

        def forget(task: asyncio.Task[None]) -> None:
            # a callback, not a `finally`: a task cancelled before its first step (a CANCEL read
            # right behind its REQUEST) never runs its body, and its stream, which may have a
            # body sink, would stay registered for the connection's life
            if self._handler_tasks.get(stream_id) is task:
                del self._handler_tasks[stream_id]
            if self._streams.get(stream_id) is stream:
                del self._streams[stream_id]
            stream.body_sink = None

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(forget)
        self._handler_tasks[stream_id] = task

    def close(self, reason: str = "closed by this node") -> None:
        """Close the connection; open streams fail with ConnectionClosedError. Idempotent."""
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._stream.close()
        for task in list(self._handler_tasks.values()):
            task.cancel()
        for stream in list(self._streams.values()):
            stream._remote_done = True
            try:
                stream._inbox.put_nowait((Kind.GOAWAY, reason, b""))
            except asyncio.QueueFull:
                pass  # its consumer will drain the queue and then see _remote_done
        self._streams.clear()
        for call in self._calls.values():
            if not call.done():
                call.set_result((Kind.GOAWAY, reason, b""))
        if asyncio.current_task() is not self._reader:
            self._reader.cancel()
        self.closed.set()

    async def aclose(self) -> None:
        self.close()
        tasks = [self._reader, *self._handler_tasks.values()]
        await asyncio.gather(*tasks, return_exceptions=True)
