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

Between two processes of one host (`AveragingSettings.shared_memory`, links not sealed) the
donor keeps its snapshot in a file under /dev/shm that it publishes (sharedmem.py: our user's
only, its header naming the donor as publisher). A downloader that says it can read one
({"read": true}) gets its offer in the head ({..., "shm": offer}) and answers {"shm": true}
if it opened the file (or false: the chunks then come on the stream). The donor then says how
far its copy has come ({"copied": bytes}, the tensors back to back, without the file's
alignment), and the downloader reads each new range with preadv straight into its tensors,
checks it, and says so ({"read": bytes}); it cancels the stream once it has read everything.
The donor copies into that file again only once no download reads it (as for the buffers the
TCP downloads stream from). For 50M fp32 the kernel's two copies through loopback TCP and its
network stack became one copy: docs/benchmarks.md.
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
from hivecli.averaging.sharedmem import PublishedReader, SharedBuffer, layout_tag
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
READ_BYTES = 64 << 20  # a downloader reading a published snapshot says how far it has come this often
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


def file_offsets(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Where each tensor starts in a published snapshot's file, 64-byte aligned (so that each
    views as its dtype), and where the last one ends: the file's layout, which a downloader
    works out from its own tensors and checks against the donor's (`layout_tag`)."""
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + -(-(t.numel() * t.element_size()) // 64) * 64)
    return offsets


@dataclass(frozen=True)
class _Head:
    """What a snapshot's copy knows first: the metadata, the buffers it copies the tensors
    into, and the offer of the file they live in where the donor publishes it (or None)."""

    metadata: Any
    buffers: list[torch.Tensor]
    offer: list[str] | None


CopyState = Callable[[Any, Sequence[torch.Tensor], bool], None]  # (metadata, tensors, finite_only)


class _Snapshot:
    """One copy of the state, made in a worker thread while downloads stream what is copied:
    the first chunk goes out after one chunk's copy, not after the whole state's (for 200 MB,
    20 ms earlier). Its fields change on the event loop only (`publish`, `finish`)."""

    def __init__(self) -> None:
        self.head: _Head | None = None  # once known
        self.copied = 0  # bytes copied so far, tensor after tensor
        self.error: BaseException | None = None
        self.finished = False
        self._changed = asyncio.Event()

    def publish(self, head: _Head | None, copied: int) -> None:
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

    async def wait(self, copied: int) -> _Head:
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
        shared_memory: bool = False,
    ):
        self.node, self.key = node, f"{prefix}.all_averagers"
        self.take_snapshot, self.chunk_bytes, self.declare_period = take_snapshot, chunk_bytes, declare_period
        self.shared_memory = shared_memory  # keep the snapshot in a file that downloaders on this host read
        self.allow_sharing = False
        self.priority: float = 0.0
        self._snapshot: _Snapshot | None = None
        self._buffers: list[torch.Tensor] = []
        self._file: SharedBuffer | None = None  # where the buffers live, if we publish them
        # a reader of it went quiet or misbehaved, and may still read: the next copy goes into a new one
        self._file_retired = False
        self._copying: asyncio.Future[None] | None = None
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

        def publish(head: _Head | None, copied: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is left to serve
                self._loop.call_soon_threadsafe(snapshot.publish, head, copied)

        def copy(metadata: Any, tensors: Sequence[torch.Tensor], finite_only: bool) -> None:
            # buffers are kept between downloads: fresh memory costs a page fault per 4 KiB
            if self._file_retired or [(b.shape, b.dtype) for b in self._buffers] != [
                (t.shape, t.dtype) for t in tensors
            ]:
                self._make_buffers(tensors)
            offsets = file_offsets(self._buffers)
            offer = self._file.offer(layout_tag(offsets)) if self._file is not None else None
            publish(_Head(metadata, list(self._buffers), offer), 0)
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

    def _make_buffers(self, tensors: Sequence[torch.Tensor]) -> None:
        """Buffers for a copy of `tensors`: in a file we publish where we may and can make one
        (in the copying thread: nobody streams from the old ones, see `_serve`)."""
        if self._file is not None:
            self._file.free()  # a download still reading it holds its own fd: the bytes stay
            self._file = None
        self._file_retired = False
        if self.shared_memory:
            offsets = file_offsets(tensors)
            try:
                self._file = SharedBuffer.create(offsets[-1], self.node.peer_id.to_bytes(), published=True)
            except OSError as e:
                logger.info(
                    "Downloads of our state on this host take loopback TCP: cannot keep a copy of %d bytes in "
                    "/dev/shm (%s)",
                    offsets[-1],
                    e.strerror or e,
                )
        if self._file is None:
            self._buffers = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
            return
        region = self._file.region(offsets[-1])
        self._buffers = [
            region[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for start, t in zip(offsets[:-1], tensors, strict=True)
        ]

    def _start_snapshot(self) -> _Snapshot:
        snapshot = _Snapshot()
        copying = self._copying = asyncio.ensure_future(asyncio.to_thread(self._copy_state, snapshot))
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
            head = await snapshot.wait(0)
            tensors = head.buffers
            reads = isinstance(payload, dict) and payload.get("read") is True
            if reads and head.offer is not None and stream.connection.same_host and not stream.connection.sealed:
                await stream.send({"metadata": head.metadata, "tensors": describe(tensors), "shm": head.offer})
                choice = (await stream.recv(timeout=LINK_TIMEOUT)).payload
                if choice == {"shm": True}:
                    await self._tell_progress(stream, snapshot, sum(t.numel() * t.element_size() for t in tensors))
                    return
                channel = channels.Channel(stream, None, lambda *_: None)  # it could not open it: the stream
            else:
                # a downloader that asks gets the chunks on a bulk link (channel.py); the head, on the stream
                channel = await channels.as_reducer(self.node.host, stream, payload, lambda *_: None, LINK_TIMEOUT)
                await stream.send({"metadata": head.metadata, "tensors": describe(tensors)})
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

    async def _tell_progress(self, stream: Stream, snapshot: _Snapshot, total: int) -> None:
        """Tell a downloader reading our published snapshot how far the copy has come, then
        wait while it reads: it says how far it has read ({"read": bytes}, more each time) at
        least every READ_BYTES, and cancels the stream once it has everything. We copy into
        that file again only after that: a reader that goes quiet for LINK_TIMEOUT, says
        something else, or takes longer than LINK_TIMEOUT per READ_BYTES in all, may still be
        reading, so the next copy goes into a new file (it keeps reading the old one)."""
        told = 0
        while told < total:
            await snapshot.wait(told + 1)
            told = min(snapshot.copied, total)
            await stream.send({"copied": told})
        deadline = self._loop.time() + LINK_TIMEOUT * (1 + total // READ_BYTES)
        read, done = 0, False
        try:
            while True:
                left = deadline - self._loop.time()
                if left <= 0:
                    return
                payload = (await stream.recv(timeout=min(left, LINK_TIMEOUT))).payload
                said = payload.get("read") if isinstance(payload, dict) else None
                if type(said) is not int or not read < said <= total:
                    logger.debug("A downloader of our state said %.60r while reading it", payload)
                    return
                read = said
        except EndOfStream:
            done = True
        except asyncio.CancelledError:
            done = True  # the downloader has read it all (or gave up: it reads nothing more)
            raise
        except HiveError as e:
            logger.debug("A downloader of our state went quiet while reading it: %s", e)
        finally:
            if not done:
                self._file_retired = True

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._copying is not None:  # it may make a file yet: free that one too
            await asyncio.wait([self._copying], timeout=LINK_TIMEOUT)
        if self._file is not None:
            self._file.free()
            self._file = None
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
    shared_memory: bool = False,
) -> tuple[Any, list[torch.Tensor]]:
    """Download a donor's state, checking it against the shapes and dtypes of `expected`.
    `progress(received_bytes, total_bytes)` is called after every chunk, on the event loop.
    The state lands in new tensors, or straight in `into` (contiguous tensors like `expected`,
    say the model's own): no allocation, no page faults and no copy, but a download that fails
    leaves them holding part of the donor's state. With `bulk`, the chunks come on a bulk link
    of their own where the donor offers one (channel.py); with `shared_memory`, from a donor of
    this host that publishes its snapshot, out of that file (the module's docstring).

    Raises:
        InvalidStateError: the donor sent a state of another shape, chunks out of order, or a
            floating-point tensor with a NaN or an infinity.
        HiveError: the donor is unreachable, refuses, goes quiet or ends the stream early.
    """
    conn = await node.host.connect(donor)
    reads = shared_memory and conn.same_host and not conn.sealed  # a published snapshot, if the donor has one
    request = {"bulk": True} if bulk else {}
    if reads:
        request["read"] = True  # donors of step 9 and earlier ignore it
    stream = await conn.open_stream(method_name(STATE_METHOD, prefix), request)
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
        if reads and "shm" in head:
            reader = _open_published(head["shm"], donor, tensors)
            if reader is not None:  # it says so to the donor, and closes the reader
                await _read_published(stream, reader, donor, tensors, views, chunk_timeout, progress)
                return head.get("metadata"), tensors
            await stream.send({"shm": False})  # the chunks, on the stream then
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


def _open_published(offer: Any, donor: PeerID, tensors: Sequence[torch.Tensor]) -> PublishedReader | None:
    """The donor's published snapshot, if its layout is that of our `tensors` and we can open
    it (a file of our user, naming the donor as its publisher); None if not (logged at debug)."""
    offsets = file_offsets(tensors)
    if not (isinstance(offer, list) and len(offer) == 3 and offer[2] == layout_tag(offsets)):
        logger.debug("Not reading donor %s's published state: another layout (%.80r)", donor, offer)
        return None
    try:
        return PublishedReader.open(offer, offsets[-1], donor.to_bytes())
    except HiveError as e:
        logger.debug("Not reading donor %s's published state: %s", donor, e)
        return None


_PIECE = 4 << 20  # a published snapshot is read and checked this much at a time, while it is in the cache


async def _read_published(
    stream: Stream,
    reader: PublishedReader,
    donor: PeerID,
    tensors: Sequence[torch.Tensor],
    views: Sequence[memoryview],
    chunk_timeout: float,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Tell the donor we read its published snapshot, and read it into `tensors` (`views`:
    their bytes) as its copy comes along, checking that it is finite, in a worker thread;
    closes `reader` whatever happens. Nothing writes into `tensors` once this returns or raises
    (cancelled, it waits for the range being read: READ_BYTES at most).

    Raises:
        InvalidStateError: the donor's progress is malformed, or its state is not finite.
        HiveError: the donor went quiet, or its file could not be read.
    """
    offsets = file_offsets(tensors)
    starts = [0]  # where each tensor starts with the tensors back to back, as the donor counts
    for view in views:
        starts.append(starts[-1] + len(view))
    total, done = starts[-1], 0
    checked = [0] * len(tensors)  # elements of each tensor found finite so far

    def read(lo: int, hi: int) -> int | None:
        """Read bytes [lo, hi) of the state; the index of a tensor found not finite, or None."""
        single_threaded_here()
        for i, (view, tensor) in enumerate(zip(views, tensors, strict=True)):
            for at in range(max(lo - starts[i], 0), min(hi - starts[i], len(view)), _PIECE):
                end = min(at + _PIECE, hi - starts[i], len(view))
                reader.readinto(view[at:end], offsets[i] + at)
                upto = end // tensor.element_size()
                if tensor.is_floating_point() and upto > checked[i]:
                    if not all_finite(tensor.view(-1)[checked[i] : upto]):
                        return i
                    checked[i] = upto
        return None

    reading: asyncio.Future[int | None] | None = None
    try:
        await stream.send({"shm": True})
        while done < total:
            copied = (await stream.recv(timeout=chunk_timeout)).payload
            copied = copied.get("copied") if isinstance(copied, dict) else None
            if type(copied) is not int or not done < copied <= total:
                raise InvalidStateError(
                    f"donor {donor} said it had copied {str(copied)[:40]} bytes of its state; expected more than "
                    f"{done} and at most {total}"
                )
            while done < copied:
                upto = min(copied, done + READ_BYTES)
                reading = asyncio.ensure_future(asyncio.to_thread(read, done, upto))
                bad = await asyncio.shield(reading)
                if bad is not None:
                    raise InvalidStateError(f"donor {donor} served a state with NaN or inf in tensor {bad}")
                done = upto
                await stream.send({"read": done})  # it copies again only once we are done
                if progress is not None:
                    progress(done, total)
    finally:
        if reading is not None and not reading.done():  # cancelled mid-read: close once the thread is done

            def close(done: asyncio.Future[int | None]) -> None:
                reader.close()
                if not done.cancelled():
                    done.exception()  # retrieved: nobody waits for it any more

            reading.add_done_callback(close)
            await asyncio.wait([reading])  # cancelled again meanwhile: the callback still closes it
        else:
            reader.close()
