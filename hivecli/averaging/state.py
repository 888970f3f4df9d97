"""State sharing: a newcomer downloads the current tensors and metadata from a peer.

Donors declare themselves under `{prefix}.all_averagers` (an owned subkey per donor, which
only that donor can write; value: [priority, addrs]). A downloader tries donors by priority,
highest first and in random order among equals (so that a crowd of newcomers spreads over
the donors), and moves on to the next donor when one fails. The donor copies its state once,
under the tensor lock, into buffers it keeps, and streams that copy without holding the lock,
so it goes on averaging meanwhile.

The stream: first message {metadata, tensors: [[shape, dtype], ...], schema}; then raw
chunks [tensor index, byte offset] + bytes, received straight into the new tensors. The
downloader checks the declared shapes and dtypes against what it expects before allocating,
and refuses a state with a NaN or an infinity (`InvalidStateError`: the donor is at fault,
not the network). Declarations whose priority is not a finite number are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hivecli._exceptions import HiveError
from hivecli.averaging import channel as channels
from hivecli.averaging.channel import Channel
from hivecli.averaging.compression import tensor_bytes
from hivecli.averaging.group import method_name
from hivecli.averaging.robust import all_finite
from hivecli.cores import single_threaded_here
from hivecli.dht.node import DHTNode
from hivecli.dht.records import owned_entries, owned_subkey
from hivecli.net.connection import EndOfStream, Stream
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.loops import wait_event
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharedState:
    """What a peer hands to newcomers: `get()` returns (msgpack-able metadata, tensors), and is
    called with `lock` held, which is kept until the tensors are copied. The download checks a
    donor's tensors against the shapes and dtypes of our own `get()`: a state may differ from
    the tensors a peer averages (a model and its optimizer, while only gradients are averaged).
    With `finite_only`, a state with a NaN or an infinity is not served (a diverged peer's)."""

    get: Callable[[], tuple[Any, Sequence[torch.Tensor]]]
    lock: contextlib.AbstractContextManager[Any]
    finite_only: bool = False


STATE_METHOD = "avg.state"
LINK_TIMEOUT = 5.0  # seconds to set up a bulk link for a download, and for its end after the last chunk
DTYPES = {
    str(dtype): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
StateSnapshot = tuple[Any, Sequence[torch.Tensor]]


class InvalidStateError(HiveError):
    """A donor served a state no honest donor serves (another shape, chunks out of order, NaN
    or inf, or metadata its downloader's `validate` refused): the downloader bans it."""


def describe(tensors: Sequence[torch.Tensor]) -> list[list[Any]]:
    return [[list(t.shape), str(t.dtype)] for t in tensors]


CopyState = Callable[[Any, Sequence[torch.Tensor], bool], None]  # (metadata, tensors, finite_only)


class _Snapshot:
    """One copy of the state, made in a worker thread while downloads stream what is copied:
    the first chunk goes out after one chunk's copy, not after the whole state's (for 200 MB,
    20 ms earlier). Its fields change on the event loop only (`publish`, `finish`)."""

    def __init__(self) -> None:
        self.head: tuple[Any, list[torch.Tensor]] | None = None  # (metadata, buffers), once known
        self.copied = 0  # bytes copied so far, tensor after tensor
        self.error: BaseException | None = None
        self.finished = False
        self._changed = asyncio.Event()

    def publish(self, head: tuple[Any, list[torch.Tensor]] | None, copied: int) -> None:
        if head is not None:
            self.head = head
        self.copied = max(self.copied, copied)
        self._pulse()

    def finish(self, error: BaseException | None) -> None:
        self.error, self.finished = error, True
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, copied: int) -> tuple[Any, list[torch.Tensor]]:
        """The head, once `copied` bytes are copied.

        Raises:
            HiveError: the copy failed (say, the state is not finite).
        """
        while self.head is None or self.copied < copied:
            if isinstance(self.error, HiveError):
                raise self.error
            if self.finished:
                raise HiveError(f"copying the state failed: {self.error or 'it ended early'}")
            await self._changed.wait()
        return self.head


class StateServer:
    """Serves this peer's state to downloaders and keeps its donor declaration fresh."""

    def __init__(
        self,
        node: DHTNode,
        prefix: str,
        take_snapshot: Callable[[CopyState], None],
        chunk_bytes: int,
        declare_period: float,
    ):
        self.node, self.key = node, f"{prefix}.all_averagers"
        self.take_snapshot, self.chunk_bytes, self.declare_period = take_snapshot, chunk_bytes, declare_period
        self.allow_sharing = False
        self.priority: float = 0.0
        self._snapshot: _Snapshot | None = None
        self._buffers: list[torch.Tensor] = []
        self._active = 0  # downloads streaming from the buffers
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._declare_forever())
        node.host.add_stream_handler(method_name(STATE_METHOD, prefix), self._serve)

    def update(self, allow_sharing: bool, priority: float) -> None:
        if (allow_sharing, priority) != (self.allow_sharing, self.priority):
            self.allow_sharing, self.priority = allow_sharing, priority
            self._changed.set()

    async def _declare_forever(self) -> None:
        declared_sharing = False
        while True:
            self._changed.clear()  # before reading the settings: a change during the store is kept
            if self.allow_sharing or declared_sharing:
                value = (
                    [self.priority, [str(m) for m in self.node.host.visible_maddrs()]] if self.allow_sharing else None
                )
                try:
                    await self.node.store(
                        self.key, value, get_dht_time() + 2 * self.declare_period, owned_subkey(self.node.peer_id)
                    )
                    declared_sharing = self.allow_sharing
                except (HiveError, OSError) as e:
                    logger.debug("Could not declare state sharing: %s", e)
            await wait_event(self._changed, self.declare_period)

    def _copy_state(self, snapshot: _Snapshot) -> None:
        """Runs in a worker thread: `take_snapshot` calls `copy` under its lock, which copies the
        state into our buffers one chunk at a time and tells the loop after each.

        Raises:
            HiveError: the state must be finite (`finite_only`, the owner's policy) and is not: a
                diverged peer must not hand it to anyone; downloads streaming from this snapshot
                fail, and move on to another donor.
        """
        single_threaded_here()  # a memory-bound copy: more threads would only slow down training

        def publish(head: tuple[Any, list[torch.Tensor]] | None, copied: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is left to serve
                self._loop.call_soon_threadsafe(snapshot.publish, head, copied)

        def copy(metadata: Any, tensors: Sequence[torch.Tensor], finite_only: bool) -> None:
            # buffers are kept between downloads: fresh memory costs a page fault per 4 KiB
            if [(b.shape, b.dtype) for b in self._buffers] != [(t.shape, t.dtype) for t in tensors]:
                self._buffers = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
            publish((metadata, list(self._buffers)), 0)
            copied = 0
            for buffer, tensor in zip(self._buffers, tensors, strict=True):
                source, target = tensor.detach().reshape(-1), buffer.view(-1)
                step = max(1, self.chunk_bytes // max(1, buffer.element_size()))
                for start in range(0, target.numel(), step):
                    piece = target[start : start + step]
                    piece.copy_(source[start : start + step])
                    if finite_only and piece.is_floating_point() and not all_finite(piece):
                        raise HiveError("this peer's state is not finite (it diverged); it does not share it")
                    copied += piece.numel() * piece.element_size()
                    publish(None, copied)

        self.take_snapshot(copy)

    def _start_snapshot(self) -> _Snapshot:
        snapshot = _Snapshot()
        copying = asyncio.ensure_future(asyncio.to_thread(self._copy_state, snapshot))
        copying.add_done_callback(lambda done: snapshot.finish(None if done.cancelled() else done.exception()))
        return snapshot

    async def _serve(self, stream: Stream, payload: Any, body: bytes) -> None:
        if not self.allow_sharing:
            raise HiveError("this peer does not share its state (allow_state_sharing=False)")
        # Downloads share one snapshot: a new copy starts only once the last one is finished and
        # nobody streams from the buffers (it would overwrite what they send); a download that
        # arrives during a copy streams what is copied as it is.
        snapshot = self._snapshot
        if snapshot is None or (snapshot.finished and self._active == 0):
            snapshot = self._snapshot = self._start_snapshot()
        self._active += 1
        channel = None
        try:
            # a downloader that asks gets the chunks on a bulk link (channel.py); the head, on the stream
            channel = await channels.as_reducer(self.node.host, stream, payload, lambda *_: None, LINK_TIMEOUT)
            metadata, tensors = await snapshot.wait(0)
            await stream.send({"metadata": metadata, "tensors": describe(tensors)})
            before = 0  # bytes of the tensors before this one
            for index, tensor in enumerate(tensors):
                data = tensor_bytes(tensor.view(-1)) if tensor.numel() else memoryview(b"")
                for offset in range(0, len(data), self.chunk_bytes):
                    end = min(offset + self.chunk_bytes, len(data))
                    await snapshot.wait(before + end)
                    await channel.send([index, offset], data[offset:end])
                before += len(data)
            if channel.bulk:  # the downloader ends the stream once it has every chunk
                with contextlib.suppress(EndOfStream):
                    await stream.recv(timeout=LINK_TIMEOUT)
        finally:
            self._active -= 1
            if channel is not None:
                channel.close()

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self.allow_sharing:
            self.allow_sharing = False
            try:  # withdraw, so that newcomers do not try us first
                await asyncio.wait_for(
                    self.node.store(
                        self.key, None, get_dht_time() + 2 * self.declare_period, owned_subkey(self.node.peer_id)
                    ),
                    1.0,
                )
            except (HiveError, OSError, asyncio.TimeoutError):
                pass


async def find_donors(node: DHTNode, prefix: str) -> list[tuple[PeerID, list[Multiaddr]]]:
    """Declared donors, best first: by priority, then at random."""
    found = await node.get(f"{prefix}.all_averagers", latest=True)
    ranked = []
    for peer, value, _ in owned_entries(found):  # only the donor itself can have written its declaration
        if not (isinstance(value, list) and len(value) == 2):
            continue
        priority, addrs = value
        # NaN would break the sort and inf would always come first: such declarations are ignored
        if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not isinstance(addrs, list):
            continue
        if not math.isfinite(priority):
            continue
        try:
            maddrs = [Multiaddr.parse(a) for a in addrs if isinstance(a, str)]
        except ValueError:
            continue
        if peer != node.peer_id:
            ranked.append((-float(priority), random.random(), peer, maddrs))
    ranked.sort(key=lambda item: item[:2])
    return [(peer, maddrs) for _, _, peer, maddrs in ranked]


async def download_state(
    node: DHTNode,
    donor: PeerID,
    expected: Sequence[torch.Tensor],
    chunk_timeout: float,
    progress: Callable[[int, int], None] | None = None,
    prefix: str = "",
    into: Sequence[torch.Tensor] | None = None,
    bulk: bool = True,
) -> tuple[Any, list[torch.Tensor]]:
    """Download a donor's state, checking it against the shapes and dtypes of `expected`.
    `progress(received_bytes, total_bytes)` is called after every chunk, on the event loop.
    The state lands in new tensors, or straight in `into` (contiguous tensors like `expected`,
    say the model's own): no allocation, no page faults and no copy, but a download that fails
    leaves them holding part of the donor's state. With `bulk`, the chunks come on a bulk link
    of their own where the donor offers one (channel.py).

    Raises:
        InvalidStateError: the donor sent a state of another shape, chunks out of order, or a
            floating-point tensor with a NaN or an infinity.
        HiveError: the donor is unreachable, refuses, goes quiet or ends the stream early.
    """
    conn = await node.host.connect(donor)
    stream = await conn.open_stream(method_name(STATE_METHOD, prefix), {"bulk": True} if bulk else {})
    channel = None
    try:
        if into is None:
            tensors = [torch.empty(t.shape, dtype=t.dtype) for t in expected]  # lazily backed: no cost yet
        else:
            tensors = [t.detach() for t in into]
        views = [tensor_bytes(t.view(-1)) if t.numel() else memoryview(b"") for t in tensors]
        position = [0, 0]  # the next (tensor, offset) we accept: chunks come strictly in order

        def skip_empty() -> None:
            while position[0] < len(views) and position[1] == len(views[position[0]]):
                position[0], position[1] = position[0] + 1, 0

        def sink(payload: Any, nbytes: int) -> memoryview | None:
            if payload == position and position[0] < len(views):
                return views[position[0]][position[1] : position[1] + nbytes]
            return None

        stream.body_sink = sink  # before the first message, so that no chunk misses it
        head = (await stream.recv(timeout=chunk_timeout)).payload
        if channels.is_ready(head):  # the donor offers a bulk link (an older one sends its head at once)
            timeout = min(chunk_timeout, LINK_TIMEOUT)
            maddrs = node.host.address_book.get(donor, [])
            channel = await channels.as_sender(node.host, stream, donor, maddrs, sink, timeout, head)
            head = (await stream.recv(timeout=chunk_timeout)).payload
        else:
            channel = Channel(stream, None, sink)
        if not isinstance(head, dict) or head.get("tensors") != describe(expected):
            declared = head.get("tensors") if isinstance(head, dict) else head
            raise InvalidStateError(
                f"donor {donor} has a state of another shape: {str(declared)[:120]} instead of "
                f"{str(describe(expected))[:120]}; is it training the same model?"
            )
        skip_empty()
        total, received = sum(len(v) for v in views), 0

        def finite_chunk(payload: Any, body: bytes | memoryview) -> bool | None:
            """Whether a chunk that landed in place holds only finite values, checked while it is
            in the cache (on a bulk link's thread); None when not known here: it did not land in
            place, is not whole elements, or is not floating point."""
            tensor = tensors[position[0]] if position[0] < len(tensors) else None
            if payload != position or tensor is None or not isinstance(body, memoryview):
                return None
            size = tensor.element_size()
            if not tensor.is_floating_point() or position[1] % size or len(body) % size:
                return None
            start = position[1] // size
            return all_finite(tensor.view(-1)[start : start + len(body) // size])

        unchecked = set()  # floating-point tensors with a chunk finite_chunk could not check
        while position[0] < len(views):
            message, finite = await channel.recv(chunk_timeout, finite_chunk)
            index, offset = position
            view = views[index]
            if message.payload != position or offset + len(message.body) > len(view) or not len(message.body):
                raise InvalidStateError(f"donor {donor} sent chunk {str(message.payload)[:40]}, expected {position}")
            if finite is False:
                raise InvalidStateError(f"donor {donor} served a state with NaN or inf in tensor {index}")
            if finite is None and tensors[index].is_floating_point():
                unchecked.add(index)
            if not isinstance(message.body, memoryview) or message.body.obj is not view.obj:
                view[offset : offset + len(message.body)] = message.body
            position[1] += len(message.body)
            received += len(message.body)
            if progress is not None:
                progress(received, total)
            skip_empty()
        for index in sorted(unchecked):
            if not all_finite(tensors[index]):
                raise InvalidStateError(f"donor {donor} served a state with NaN or inf in tensor {index}")
        return head.get("metadata"), tensors
    except EndOfStream:
        raise HiveError(f"donor {donor} ended the download early") from None
    finally:
        if channel is not None:
            channel.close()
        await stream.cancel()
