"""Bulk links: a TCP connection of its own for one transfer of tensor bytes, driven by blocking
calls on two worker threads (one per direction) instead of the event loop.

Why: on a peer's multiplexed connection every byte of an all-reduce passes through the event
loop, one readiness event and one read of at most the socket's buffer at a time, on the one
thread that also runs the round's logic. Measured on 2 cores (issue 14), that costs about twice
gloo's CPU per byte. A blocking `sendall` or `recv_into(MSG_WAITALL)` moves an 8 MiB chunk in
one system call; socket calls, the cipher and torch's ops release the GIL, so two peers' worth of
bytes move on two cores while the loop stays free for control messages.

How a link is made. The side that will accept calls `BulkLinks.offer()`, which makes a
one-time 32-byte token (and, where their connection is sealed, a fresh AES-256-GCM key per
direction) and sends it to the other side over their existing authenticated connection. The
other side dials the acceptor's listening port (`dial`) and sends the token as its first frame,
where a handshake HELLO would be. The host passes such a connection to `BulkAcceptor.accept`
instead of running the handshake; an unknown or expired token closes it. Both ends then take
the socket out of the event loop (`ByteStream.detach`). Streams that cannot be detached (relayed
circuits, the in-memory transport) make `dial` fail; callers then use their connection's streams.
An offer without keys in a swarm that encrypts (their connection runs unsealed between two
processes of one host, handshake.py) is good only for a link whose two ends are on this host:
either end closes any other.

What flows: the framing of framing.py (prefix, msgpack header, raw body), with the same limits,
sealed into AES-256-GCM records of at most `MAX_RECORD_BYTES` as in secure.py when the link has
keys. Every call has a deadline; `close` wakes a thread blocked in the kernel at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag

from hivecli._exceptions import ConnectionClosedError, HiveError, PeerUnreachableError, ProtocolError, RPCTimeoutError
from hivecli.net.connection import BodySink, Message
from hivecli.net.framing import PREFIX, FrameLimits, describe, encode_frame, read_frame, unpack
from hivecli.net.handshake import HANDSHAKE_LIMITS, PROTOCOL_NAME
from hivecli.net.secure import (
    KEY_BYTES,
    MAX_RECORD_BYTES,
    RECORD_LENGTH,
    TAG_BYTES,
    RecordIntegrityError,
    open_record,
    record_cipher,
    seal_record,
)
from hivecli.net.transport import ByteStream, Transport, same_host_socket
from hivecli.utils.loops import timeout as _timeout

logger = logging.getLogger(__name__)

TOKEN_BYTES = 32
FAILURE_MEMORY_S = 300.0
OFFER_TTL = 30.0  # seconds an offer waits for its dialer
MAX_OFFERS = 256  # outstanding offers per host: a peer cannot make us hold unbounded futures
_ACK = b"hive-bulk-ok"
# A blocked system call returns at least this often, so that a deadline or `close` is noticed
# even if shutdown() could not wake it.
_TICK_S = 1.0


@dataclass(frozen=True)
class BulkOffer:
    """What the accepting side sends the dialing side: the token, and the keys if sealed.

    `keys` is (dialer -> acceptor, acceptor -> dialer)."""

    token: bytes = field(repr=False)
    keys: tuple[bytes, bytes] | None = field(default=None, repr=False)

    def to_wire(self) -> list[Any]:
        return [self.token, list(self.keys) if self.keys else None]

    @classmethod
    def from_wire(cls, raw: Any) -> BulkOffer:
        """Raises ValueError: `raw` is not an offer as `to_wire` makes them."""
        if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], bytes) and len(raw[0]) == TOKEN_BYTES):
            raise ValueError(f"not a bulk offer: {describe(raw, 40)}")
        keys = raw[1]
        if keys is None:
            return cls(raw[0])
        if not (
            isinstance(keys, list)
            and len(keys) == 2
            and all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys)
            and keys[0] != keys[1]
        ):
            raise ValueError("a bulk offer's keys must be two different 32-byte keys")
        return cls(raw[0], (keys[0], keys[1]))


class BulkLinks:
    """A host's bulk links: the offers it has made and the connections that redeem them (one
    per offer), and the peers it recently failed to dial one to (not tried again for a while:
    each try can cost a connect timeout, every round)."""

    def __init__(self, transport: Transport, limits: FrameLimits, encrypt: bool):
        self.transport, self.limits, self.encrypt = transport, limits, encrypt
        self._failed: dict[str, float] = {}  # peer -> monotonic time of its last failed dial
        # token -> (offer, the future its link resolves, its expiry timer, who it was offered to)
        self._offers: dict[bytes, tuple[BulkOffer, asyncio.Future[BulkLink], asyncio.TimerHandle, str]] = {}

    def offer(
        self, where: str, sealed: bool = True, ttl: float = OFFER_TTL
    ) -> tuple[BulkOffer, asyncio.Future[BulkLink]]:
        """A new offer, and the future its link will resolve (cancelled after `ttl` seconds).
        `sealed`: whether the connection the offer goes out on is (Connection.sealed); the link
        is sealed if that connection is.

        Raises:
            ConnectionClosedError: MAX_OFFERS offers are outstanding already.
        """
        if len(self._offers) >= MAX_OFFERS:
            raise ConnectionClosedError(f"{MAX_OFFERS} bulk links are pending already")
        keys = (os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)) if self.encrypt and sealed else None
        offer = BulkOffer(os.urandom(TOKEN_BYTES), keys)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BulkLink] = loop.create_future()
        timer = loop.call_later(ttl, self.withdraw, offer.token)
        self._offers[offer.token] = (offer, future, timer, where)
        return offer, future

    def _stays_on_host(self, offer: BulkOffer) -> bool:
        """Whether the link of `offer` must join two ends on this host: it has no keys, and our
        swarm encrypts (its connection ran unsealed, handshake.py's same-host case)."""
        return self.encrypt and offer.keys is None

    def withdraw(self, token: bytes) -> None:
        """Forget an offer; its future is cancelled if nobody redeemed it."""
        entry = self._offers.pop(token, None)
        if entry is not None:
            entry[2].cancel()
            entry[1].cancel()

    def divert(self, stream: ByteStream) -> Callable[[dict[str, Any]], bool]:
        """For `perform_handshake`: takes `stream` for a bulk link if its first frame asks for one."""

        def divert(first: dict[str, Any]) -> bool:
            if not (first.get("protocol") == PROTOCOL_NAME and "bulk" in first):
                return False
            self.accept(stream, first)
            return True

        return divert

    def accept(self, stream: ByteStream, hello: dict[str, Any]) -> bool:
        """Redeem an offer with a connection whose first frame was a bulk HELLO; closes the
        stream and returns False when the token is unknown or the stream cannot be detached."""
        token = hello.get("bulk")
        entry = self._offers.pop(token, None) if isinstance(token, bytes) else None
        if entry is None:
            stream.close()
            return False
        offer, future, timer, where = entry
        timer.cancel()
        sock = stream.detach()
        if sock is None:
            stream.close()
            future.cancel()
            return False
        if self._stays_on_host(offer) and not same_host_socket(sock):
            logger.warning("Refused an unsealed bulk link for %s from %s: not on this host", where, stream.remote_host)
            sock.close()
            future.cancel()
            return False
        try:
            sock.sendall(_ACK)  # a few bytes into an empty socket buffer: never blocks
        except OSError:
            sock.close()
            future.cancel()
            return False
        keys = None if offer.keys is None else (offer.keys[1], offer.keys[0])
        link = BulkLink(sock, keys, self.limits, where)
        if future.done():  # its waiter gave up: nobody will use or close the link
            link.close()
            return False
        future.set_result(link)
        return True

    def close(self) -> None:
        for token in list(self._offers):
            self.withdraw(token)

    async def dial(
        self, peer: str, addresses: list[tuple[str, int]], offer: BulkOffer, timeout: float
    ) -> BulkLink | None:
        """The link `offer` was made for, from the first of `addresses` that takes it, or None
        when none does (then this peer is not tried again for FAILURE_MEMORY_S seconds)."""
        failed = self._failed.get(peer)
        if failed is not None and time.monotonic() - failed < FAILURE_MEMORY_S:
            return None
        for host, port in addresses:
            try:
                link = await dial(self.transport, host, port, offer, timeout, self.limits, f"peer {peer}")
                if self._stays_on_host(offer) and not link.same_host:
                    link.close()  # unsealed bytes only where they never leave this host
                    raise PeerUnreachableError(f"peer {peer} offered an unsealed bulk link to {host}, not on this host")
                return link
            except HiveError as e:  # unreachable, or out of file descriptors
                logger.debug("%s", e)
        if len(self._failed) > 4096:
            self._failed.clear()
        self._failed[peer] = time.monotonic()
        return None


async def dial(
    transport: Transport, host: str, port: int, offer: BulkOffer, timeout: float, limits: FrameLimits, where: str
) -> BulkLink:
    """Open the link `offer` was made for, at the acceptor's host:port.

    Raises:
        PeerUnreachableError: no connection within `timeout`, no acknowledgement, or a transport
            whose streams cannot leave the event loop.
    """
    stream = await transport.dial(host, port, timeout)
    try:
        async with _timeout(timeout):
            for part in encode_frame({"protocol": PROTOCOL_NAME, "bulk": offer.token}):
                stream.write(part)
            await stream.drain()
            await read_frame(stream, HANDSHAKE_LIMITS)  # the acceptor's HELLO: it greets every dialer
            ack = await stream.read_exactly(len(_ACK))
        if not hmac.compare_digest(ack, _ACK):
            raise PeerUnreachableError(f"{where} answered a bulk link with {describe(ack, 40)}")
        sock = stream.detach()
        if sock is None:
            raise PeerUnreachableError(f"the connection to {where} cannot carry a bulk link (not plain TCP)")
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
        stream.close()
        raise PeerUnreachableError(f"bulk link to {where} failed: {e or type(e).__name__}") from None
    except BaseException:
        stream.close()
        raise
    return BulkLink(sock, offer.keys, limits, where)


class BulkLink:
    """Framed, optionally sealed messages over a blocking socket; each direction runs on its own
    thread, so one task may send while another receives. Close it when done."""

    def __init__(self, sock: socket.socket, keys: tuple[bytes, bytes] | None, limits: FrameLimits, where: str):
        """`keys` is (send key, receive key), or None for plaintext."""
        sock.setblocking(True)
        tick = struct.pack("ll", int(_TICK_S), int(_TICK_S % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tick)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tick)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.where, self.limits = where, limits
        self._sock = sock
        self.same_host = same_host_socket(sock)
        self._sealer = record_cipher(keys[0]) if keys else None
        self._opener = record_cipher(keys[1]) if keys else None
        self._sent = self._received = 0  # record counters: the nonces
        self._scratch = bytearray()
        self._closed = False
        self._users = 2  # the two threads; the last one out closes the socket
        self._lock = threading.Lock()
        self._send_thread = ThreadPoolExecutor(1, thread_name_prefix="hive-bulk-send")
        self._recv_thread = ThreadPoolExecutor(1, thread_name_prefix="hive-bulk-recv")
        self.bytes_sent = self.bytes_received = 0

    # ---- the event loop's side -----------------------------------------------------------------

    async def send(
        self, payload: Any, body: bytes | bytearray | memoryview = b"", timeout: float | None = None
    ) -> None:
        """Send one message.

        Raises:
            ConnectionClosedError: the link is closed or broke.
            RPCTimeoutError: the peer did not take the bytes within `timeout` seconds.
        """
        await self._run(self._send_thread, self._send_blocking, payload, body, timeout)

    async def recv(
        self,
        sink: BodySink | None = None,
        timeout: float | None = None,
        check: Callable[[Any, bytes | memoryview], Any] | None = None,
    ) -> tuple[Message, Any]:
        """Receive one message; its body lands in the view `sink(payload, body_len)` returns, or
        in new bytes when it returns None. `check(payload, body)` runs on the receiving thread while the
        bytes are still in the cache; its result comes back beside the message.

        Raises:
            ConnectionClosedError: the link is closed or broke.
            RPCTimeoutError: no whole message within `timeout` seconds.
            ProtocolError: a frame over the limits, malformed, or failing its integrity check
                (the link is closed).
        """
        return await self._run(self._recv_thread, self._recv_blocking, sink, timeout, check)

    def close(self) -> None:
        """Close the link; calls blocked in either thread return at once with an error."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for thread in (self._send_thread, self._recv_thread):
            thread.submit(self._release)
            thread.shutdown(wait=False)

    async def _run(self, thread: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise ConnectionClosedError(f"the bulk link to {self.where} is closed")
        try:
            return await asyncio.wrap_future(thread.submit(fn, *args))
        except asyncio.CancelledError:
            self.close()  # the thread may be mid-message: the link cannot be used again
            raise
        except (ProtocolError, RPCTimeoutError):
            self.close()
            raise
        except (OSError, EOFError) as e:
            self.close()
            raise ConnectionClosedError(f"the bulk link to {self.where} broke: {e or type(e).__name__}") from None

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._sock.close()

    # ---- the threads' side -------------------------------------------------------------------

    def _send_blocking(self, payload: Any, body: bytes | bytearray | memoryview, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        head, body = encode_frame(payload, body)
        view = memoryview(body).cast("B") if len(body) else memoryview(b"")
        if self._sealer is None:
            self._sendall(head, deadline)
            if len(view):
                self._sendall(view, deadline)
        else:
            self._sendall(self._seal(head), deadline)
            for start in range(0, len(view), MAX_RECORD_BYTES):
                self._sendall(self._seal(view[start : start + MAX_RECORD_BYTES]), deadline)
        self.bytes_sent += len(head) + len(view)

    def _seal(self, plain: bytes | memoryview) -> bytearray:
        assert self._sealer is not None
        record = seal_record(self._sealer, self._sent, plain)
        self._sent += 1
        return record

    def _sendall(self, data: bytes | bytearray | memoryview, deadline: float | None) -> None:
        view = memoryview(data)
        while len(view):
            self._check(deadline, "take")
            try:
                sent = self._sock.send(view)
            except BlockingIOError:  # SO_SNDTIMEO: a tick passed with the peer not reading
                continue
            view = view[sent:]

    def _recv_blocking(
        self, sink: BodySink | None, timeout: float | None, check: Callable[[Any, bytes | memoryview], Any] | None
    ) -> tuple[Message, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._opener is None:
            prefix = self._recv_bytes(PREFIX.size, deadline)
            header_len, body_len = self._check_lengths(prefix)
            payload = unpack(self._recv_bytes(header_len, deadline))
        else:
            head = self._open_record(deadline, None)
            if len(head) < PREFIX.size:
                raise ProtocolError(f"{self.where} sent a bulk frame without its prefix")
            header_len, body_len = self._check_lengths(head[: PREFIX.size])
            if len(head) != PREFIX.size + header_len:
                raise ProtocolError(f"{self.where} sent a bulk header record of the wrong length")
            payload = unpack(head[PREFIX.size :])
        target = sink(payload, body_len) if sink is not None and body_len else None
        if target is not None and target.nbytes != body_len:
            target = None
        body: bytes | memoryview = target if target is not None else bytearray(body_len)
        view = memoryview(body).cast("B") if body_len else memoryview(b"")
        if self._opener is None:
            self._recv_into(view, deadline)
        else:
            pos = 0
            while pos < body_len:
                pos += len(self._open_record(deadline, view[pos:]))
        self.bytes_received += PREFIX.size + header_len + body_len
        message = Message(payload, body if target is not None else bytes(body))
        return message, (check(payload, message.body) if check is not None else None)

    def _check_lengths(self, prefix: bytes | memoryview) -> tuple[int, int]:
        header_len, body_len = PREFIX.unpack(prefix)
        if header_len > self.limits.max_header_bytes or body_len > self.limits.max_body_bytes:
            raise ProtocolError(
                f"{self.where} declared a bulk frame of {header_len} + {body_len} bytes, over the limits "
                f"of {self.limits.max_header_bytes} + {self.limits.max_body_bytes}"
            )
        return header_len, body_len

    def _open_record(self, deadline: float | None, into: memoryview | None) -> memoryview:
        """The next sealed record, opened into the front of `into` or, without one, into new bytes."""
        assert self._opener is not None
        header = self._recv_bytes(RECORD_LENGTH.size, deadline)
        (length,) = RECORD_LENGTH.unpack(header)
        if length > MAX_RECORD_BYTES or (into is not None and length > len(into)):
            raise ProtocolError(
                f"{self.where} sent a bulk record of {length} bytes where at most {MAX_RECORD_BYTES} fit"
            )
        if len(self._scratch) < length + TAG_BYTES:
            self._scratch = bytearray(length + TAG_BYTES)
        sealed = memoryview(self._scratch)[: length + TAG_BYTES]
        self._recv_into(sealed, deadline)
        out = into[:length] if into is not None else memoryview(bytearray(length))
        try:
            open_record(self._opener, self._received, header, sealed, out)
        except InvalidTag:
            raise RecordIntegrityError(
                f"integrity check failed on bulk record {self._received} from {self.where}: it was modified, "
                f"replayed or reordered on the way; dropping the link"
            ) from None
        self._received += 1
        return out

    def _recv_bytes(self, n: int, deadline: float | None) -> bytes:
        buffer = bytearray(n)
        self._recv_into(memoryview(buffer), deadline)
        return bytes(buffer)

    def _recv_into(self, view: memoryview, deadline: float | None) -> None:
        pos = 0
        while pos < len(view):
            self._check(deadline, "send")
            try:
                got = self._sock.recv_into(view[pos:], len(view) - pos, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO: a tick without all the bytes; they may still come
                continue
            if got == 0:
                raise EOFError("the peer closed the link")
            pos += got

    def _check(self, deadline: float | None, verb: str) -> None:
        if self._closed:
            raise EOFError("the link was closed")
        if deadline is not None and time.monotonic() > deadline:
            raise RPCTimeoutError(f"{self.where} did not {verb} a bulk message in time")
