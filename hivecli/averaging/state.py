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


class StateServer:
    """Serves this peer's state to downloaders and keeps its donor declaration fresh."""

    def __init__(
        self,
        node: DHTNode,
        prefix: str,
        take_snapshot: Callable[[Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]], StateSnapshot],
        chunk_bytes: int,
        declare_period: float,
    ):
        self.node, self.key = node, f"{prefix}.all_averagers"
        self.take_snapshot, self.chunk_bytes, self.declare_period = take_snapshot, chunk_bytes, declare_period
        self.allow_sharing = False
        self.priority: float = 0.0
        self._snapshot: tuple[Any, list[torch.Tensor]] | None = None
        self._buffers: list[torch.Tensor] = []
        self._active = 0  # downloads streaming from the buffers
        self._copying: asyncio.Future[tuple[Any, list[torch.Tensor]]] | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._declare_forever())
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

    def _copy_state(self) -> tuple[Any, list[torch.Tensor]]:
        """Runs in a worker thread; `take_snapshot` calls `_copy_into_buffers` under its lock."""
        single_threaded_here()  # a memory-bound copy: more threads would only slow down training
        metadata, tensors = self.take_snapshot(self._copy_into_buffers)
        return metadata, list(tensors)

    def _copy_into_buffers(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # buffers are kept between downloads: fresh memory costs a page fault per 4 KiB
        if [(b.shape, b.dtype) for b in self._buffers] != [(t.shape, t.dtype) for t in tensors]:
            self._buffers = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
        for buffer, tensor in zip(self._buffers, tensors, strict=True):
            buffer.copy_(tensor.detach())
        return self._buffers

    async def _serve(self, stream: Stream, payload: Any, body: bytes) -> None:
        if not self.allow_sharing:
            raise HiveError("this peer does not share its state (allow_state_sharing=False)")
        # Downloads share one snapshot: a new copy starts only when nobody streams from the
        # buffers (it would overwrite what they send), and a download that arrives during a
        # copy waits for that copy instead of reading half-written buffers.
        if self._copying is None and (self._active == 0 or self._snapshot is None):
            self._copying = asyncio.ensure_future(asyncio.to_thread(self._copy_state))
        if self._copying is not None:
            copying = self._copying
            try:
                self._snapshot = await asyncio.shield(copying)
            finally:
                if self._copying is copying and copying.done():
                    self._copying = None
        assert self._snapshot is not None
        metadata, tensors = self._snapshot
        self._active += 1
        try:
            await stream.send({"metadata": metadata, "tensors": describe(tensors)})
            for index, tensor in enumerate(tensors):
                data = tensor_bytes(tensor.view(-1)) if tensor.numel() else memoryview(b"")
                for offset in range(0, len(data), self.chunk_bytes):
                    await stream.send([index, offset], data[offset : offset + self.chunk_bytes])
        finally:
            self._active -= 1

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
) -> tuple[Any, list[torch.Tensor]]:
    """Download a donor's state, checking it against the shapes and dtypes of `expected`.
    `progress(received_bytes, total_bytes)` is called after every chunk, on the event loop.
    The state lands in new tensors, or straight in `into` (contiguous tensors like `expected`,
    say the model's own): no allocation, no page faults and no copy, but a download that fails
    leaves them holding part of the donor's state.

    Raises:
        InvalidStateError: the donor sent a state of another shape, chunks out of order, or a
            floating-point tensor with a NaN or an infinity.
        HiveError: the donor is unreachable, refuses, goes quiet or ends the stream early.
    """
    conn = await node.host.connect(donor)
    stream = await conn.open_stream(method_name(STATE_METHOD, prefix), {})
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
        if not isinstance(head, dict) or head.get("tensors") != describe(expected):
            declared = head.get("tensors") if isinstance(head, dict) else head
            raise InvalidStateError(
                f"donor {donor} has a state of another shape: {str(declared)[:120]} instead of "
                f"{str(describe(expected))[:120]}; is it training the same model?"
            )
        skip_empty()
        total, received = sum(len(v) for v in views), 0
        while position[0] < len(views):
            message = await stream.recv(timeout=chunk_timeout)
            index, offset = position
            view = views[index]
            if message.payload != position or offset + len(message.body) > len(view) or not len(message.body):
                raise InvalidStateError(f"donor {donor} sent chunk {str(message.payload)[:40]}, expected {position}")
            if not isinstance(message.body, memoryview) or message.body.obj is not view.obj:
                view[offset : offset + len(message.body)] = message.body
            position[1] += len(message.body)
            received += len(message.body)
            if progress is not None:
                progress(received, total)
            skip_empty()
        for index, tensor in enumerate(tensors):
            if tensor.is_floating_point() and tensor.numel() and not all_finite(tensor):
                raise InvalidStateError(f"donor {donor} served a state with NaN or inf in tensor {index}")
        return head.get("metadata"), tensors
    except EndOfStream:
        raise HiveError(f"donor {donor} ended the download early") from None
    finally:
        await stream.cancel()
