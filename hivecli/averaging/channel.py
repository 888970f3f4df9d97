"""Where one sender's span travels to its reducer and back: on a bulk link of their own
(hivecli.net.bulk: blocking sockets on worker threads), or on the part stream itself.

The part stream always carries the round's control messages (the reducer's "ready", audits,
the sender's end). The chunks take a bulk link when the sender asks for one (its span is at
least `BULK_MIN_BYTES` and `bulk_links = "all"`), the reducer offers one in its "ready", and
the sender can dial the reducer directly; the sender then says on the stream which way its
chunks come. A reducer or sender of an older version neither asks nor offers, so both use the
stream. State downloads use the same exchange (state.py), the donor in the reducer's part.

    sender                                   reducer
    request {..., "bulk": true}      ->
    (without "bulk": the first chunks, allreduce.EAGER_BYTES at most, go at once)
                                     <-      "pending"   (only to a sender that says "wait": true,
                                                          while the reducer's owner holds the round)
                                     <-      ["ready", offer]   (or "ready": no bulk link)
    dial the offer's token to the reducer's port; then
    {"bulk": true | false}           ->
    chunks and averages on the link, or on the stream

Between two processes of one host (sharedmem.py) the request offers the sender's shared buffer
for the averages ({..., "shm": offer}, never with "bulk") and the "ready" the reducer's for the
part (["ready", {"shm": offer or None}]). Each side then copies its chunks into the other's
buffer and sends each chunk's message on the stream without a body; where a side could not map
the other's buffer, its chunks take the stream. A sender that can read a reducer's published
averages says so ({..., "read": true}); a reducer that publishes them offers that buffer too
(["ready", {"shm": ..., "avg": offer}]), and the sender reads every average there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from hivecli._exceptions import HiveError
from hivecli.cores import single_threaded_here
from hivecli.net.bulk import BulkLink, BulkOffer
from hivecli.net.connection import BodySink, Message, Stream
from hivecli.net.framing import describe
from hivecli.net.host import Host
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr

READY = "ready"
# A member of the group whose owner has not let its scheduled round go yet (StepControl) says so
# instead of "ready", to a sender that can hear it: the sender then knows it is alive and waits.
PENDING = "pending"
# Below this a span's chunks take the stream: setting a round's links up cost 5-7 ms per step
# with 2 peers (docs/benchmarks.md), which small rounds would feel and which buys them nothing.
BULK_MIN_BYTES = 1024 * 1024

Check = Callable[[Any, "bytes | memoryview"], Any]


class Channel:
    """Chunk messages between a sender and a reducer, on a bulk link or on their stream."""

    def __init__(
        self, stream: Stream, link: BulkLink | None, sink: BodySink, remote_buffer: Any = None, published: Any = None
    ):
        self.stream, self.link, self.sink = stream, link, sink
        self.remote_buffer = remote_buffer  # the reducer's offer of its shared buffer for our chunks, if it made one
        self.published = published  # its offer of the buffer it publishes its averages in, if it made one
        if link is None:
            stream.body_sink = sink

    @property
    def bulk(self) -> bool:
        return self.link is not None

    async def send(self, payload: Any, body: bytes | bytearray | memoryview) -> None:
        """Raises HiveError (ConnectionClosedError) if the link or stream broke."""
        if self.link is not None:
            await self.link.send(payload, body)
        else:
            await self.stream.send(payload, body)

    async def recv(self, timeout: float | None, check: Check) -> tuple[Message, Any]:
        """The next chunk, and what `check(payload, body)` says of it; on a bulk link the check
        runs on the receiving thread, while the bytes are still in the cache.

        Raises:
            EndOfStream: the other side ended the stream instead.
            HiveError: the link or stream broke or timed out; ValueError: what `check` raises.
        """
        if self.link is not None:
            return await self.link.recv(self.sink, timeout, _single_threaded(check))
        message = await self.stream.recv(timeout=timeout)
        return message, check(message.payload, message.body)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


def _single_threaded(check: Check) -> Check:
    """`check` for a bulk link's receiving thread: its torch ops on one OpenMP thread, as on
    the DHT's thread (hivecli.cores.single_threaded_here)."""

    def run(payload: Any, body: bytes | memoryview) -> Any:
        single_threaded_here()
        return check(payload, body)

    return run


def is_ready(payload: Any) -> bool:
    """Whether a message is the other side's "ready", with or without an offer."""
    return payload == READY or (isinstance(payload, list) and len(payload) == 2 and payload[0] == READY)


async def as_sender(
    host: Host,
    stream: Stream,
    peer: PeerID,
    maddrs: list[Multiaddr],
    sink: BodySink,
    timeout: float,
    ready: Any = None,
    on_pending: Callable[[], float] | None = None,
) -> Channel:
    """The asking side, right after its request: read the other side's "ready" (unless the
    caller already did: `ready`), and dial its offer if it made one. A request that said
    "wait" passes `on_pending`: if the other side answers "pending" first, it is called and
    says how many more seconds to wait for the "ready".

    Raises:
        ValueError: the other side answered something other than "ready".
        HiveError, EndOfStream: the stream broke or the other side did not answer in time.
    """
    stream.body_sink = sink  # from the start: no chunk that comes on the stream may miss it
    if ready is None:
        ready = (await stream.recv(timeout=2 * timeout)).payload
        if ready == PENDING and on_pending is not None:
            ready = (await stream.recv(timeout=on_pending())).payload
    if ready == READY:
        return Channel(stream, None, sink)
    if not is_ready(ready):
        raise ValueError(f"expected {READY!r} from the reducer, got {describe(ready, 40)}")
    if isinstance(ready[1], dict):  # a request that offered a shared buffer: the reducer's own offer, or None
        return Channel(stream, None, sink, ready[1].get("shm"), ready[1].get("avg"))
    offer = BulkOffer.from_wire(ready[1])
    link = await host.bulk.dial(str(peer), _direct_addresses(maddrs, stream), offer, timeout)
    try:
        await stream.send({"bulk": link is not None})
    except BaseException:
        if link is not None:
            link.close()
        raise
    return Channel(stream, link, sink)


async def as_reducer(
    host: Host,
    stream: Stream,
    request: Any,
    sink: BodySink,
    timeout: float,
    shared: list[str] | None = None,
    published: list[str] | None = None,
) -> Channel:
    """The reducer's side of a sender's request: send "ready" (with an offer if the sender asked
    for a bulk link; with the offer of our `shared` buffer for its chunks, or None, if it
    offered one of its own, and of the buffer we `published` our averages in, if we do:
    sharedmem.py), then learn which way the chunks come.

    Raises:
        HiveError, EndOfStream: the stream broke, or the sender did not answer in time.
    """
    stream.body_sink = sink  # from the start: no chunk that comes on the stream may miss it
    if isinstance(request, dict) and "shm" in request:
        await stream.send([READY, {"shm": shared} if published is None else {"shm": shared, "avg": published}])
        return Channel(stream, None, sink)
    if not (isinstance(request, dict) and request.get("bulk") is True):
        await stream.send(READY)
        return Channel(stream, None, sink)
    offer, future = host.bulk.offer(str(stream.remote_peer), stream.connection.sealed)
    try:
        await stream.send([READY, offer.to_wire()])
        choice = await stream.recv(timeout=timeout)
        if choice.payload == {"bulk": True}:
            # the sender says so only once we acknowledged its connection, which resolved the future
            link = await asyncio.wait_for(asyncio.shield(future), timeout)
            return Channel(stream, link, sink)
        if choice.payload != {"bulk": False}:
            raise HiveError(f"expected the sender's choice of link, got {describe(choice.payload, 40)}")
        return Channel(stream, None, sink)
    except asyncio.TimeoutError:
        raise HiveError(f"the sender's bulk link did not arrive within {timeout:g} s") from None
    finally:
        host.bulk.withdraw(offer.token)


def _direct_addresses(maddrs: list[Multiaddr], stream: Stream) -> list[tuple[str, int]]:
    """The other side's own addresses (no relays), the one our connection reaches first."""
    seen = stream.connection.remote_host
    addresses = [(m.host, m.port) for m in maddrs if m.relay is None and not m.is_unspecified]
    addresses.sort(key=lambda a: a[0] != seen)
    return list(dict.fromkeys(addresses))[:4]
