"""Butterfly all-reduce: every member reduces one span of the flattened tensors.

Each sender opens one stream to each reducer and sends it that reducer's span of its own
tensors, chunk by chunk, as raw codec bytes that land straight in the reducer's buffer for it.
Only the first EAGER_BYTES go before the reducer's "ready" (sent once that buffer exists), so
that a reducer never holds more than that per sender in memory on the way, and the link is
busy during the round trip "ready" takes. As soon as every sender has delivered chunk c, the
reducer averages it and sends it back on the same streams, while later chunks are still
arriving: sending, receiving, reducing and returning all overlap, and every stream runs at once.
Where a peer has cores to spare, the reductions and copies of big chunks run in slices on a few
threads at once (slices.py). Between the processes of one host, chunks go through shared memory
(sharedmem.py); a reducer with two senders or more there publishes its averages in one buffer
that they all read, and a float32 mean is averaged straight into it: the reducer's tensors keep
its input until every reader is done with the round, and get the averages only then.

Faults: a sender that does not open its stream within `request_timeout`, or goes quiet for
`next_chunk_timeout`, is dropped. A member whose owner holds its scheduled round (StepControl)
says "pending" to the part streams it gets (channel.py), and is waited for up to
`late_timeout` (half the round's allreduce_timeout), or until its connection breaks. The chunks
not yet final are averaged over those still alive (each chunk is the weighted mean of the peers
that delivered it, and every survivor gets the same values). A reducer that fails leaves its
span at the sender's local values. Averages are applied to the tensors only once a whole span
has arrived, so a half-received part is never used.

Hostile members: a reducer drops a sender whose chunk holds a NaN or an infinity, and caps
every weight at `max_weight_ratio` times the median (robust.py); `aggregation` can replace
the weighted mean by a trimmed mean or CenteredClip. A sender keeps its local values for the
span of a reducer that returns a non-finite average. Both kinds of offenders end up in
`offenders`, which the averager bans for `ban_duration`; banned members are neither served
nor sent to (their spans keep local values).

Reducer audit (`verify_reducers`, on by default; audit.py): once a sender has all of a reducer's
averages, and before it applies them, it asks the reducer for the inputs it aggregated at a few
random positions of its span and checks them against what it sent and against the averages
returned; not where it reads them in a buffer the reducer published, which only a process of
our own user can (sharedmem.py, "Trust"). A reducer that fails is treated like one that
returned non-finite averages (local values, banned); one that does not answer is a failed
reducer (local values, no ban). The runner keeps a ReducerAudit that copies its input as each
chunk is finalized, answers audits as a reducer, and runs them as a sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import torch

from hivecli._exceptions import AllreduceError, HiveError
from hivecli.averaging import channel as channels
from hivecli.averaging.audit import AuditFailed, AuditUnanswered, ReducerAudit
from hivecli.averaging.buffers import BufferPool, ChunkedBuffer
from hivecli.averaging.channel import BULK_MIN_BYTES, Channel
from hivecli.averaging.compression import Codec, NoCompression, tensor_bytes
from hivecli.averaging.group import GroupInfo
from hivecli.averaging.pacing import RoundSampler
from hivecli.averaging.partition import Chunk, Layout, load_balance
from hivecli.averaging.robust import aggregate, all_finite, cap_weights
from hivecli.averaging.settings import AveragingSettings
from hivecli.averaging.sharedmem import SHM, SharedBuffers
from hivecli.averaging.slices import SliceWorkers
from hivecli.net.connection import Connection, EndOfStream, Stream
from hivecli.net.host import Host
from hivecli.net.identity import PeerID
from hivecli.utils.loops import timeout as _timeout

logger = logging.getLogger(__name__)

PART_METHOD = "avg.part"
# A sender sends up to this many bytes of its part before the reducer's "ready", which covers
# that round trip on a WAN link (100 Mbit/s x 50 ms is 625 KB); a reducer whose runner does not
# exist yet holds them in the stream's queue, so it is what a reducer may hold per sender; and
# at most EAGER_CHUNKS messages, far below any stream's queue (NetSettings.stream_queue_size).
EAGER_BYTES = 1024 * 1024
EAGER_CHUNKS = 4


def wants_bulk_link(settings: AveragingSettings, span_bytes: int) -> bool:
    """Whether a sender asks its reducer for a bulk link for a span of `span_bytes`."""
    return settings.bulk_links == "all" and span_bytes >= BULK_MIN_BYTES


class HostilePeerError(HiveError):
    """A peer sent values no honest peer sends (NaN or infinity); it is dropped and banned."""


class AllReduceRunner:
    """One member's side of one all-reduce round."""

    def __init__(
        self,
        host: Host,
        group: GroupInfo,
        tensors: Sequence[torch.Tensor],
        weight: float,
        codec: Codec,
        settings: AveragingSettings,
        pool: BufferPool,
        banned: Collection[PeerID] = (),
        part_method: str = PART_METHOD,
        slices: SliceWorkers | None = None,
        pace: float | None = None,
        sampler: RoundSampler | None = None,
        shared: SharedBuffers | None = None,
    ):
        self.host, self.group, self.tensors = host, group, list(tensors)
        self.part_method = part_method
        self.banned = set(banned)
        self.weight, self.codec, self.settings, self.pool = weight, codec, settings, pool
        self.slices = slices if slices is not None else SliceWorkers()  # big copies and reductions, split
        self.index = group.index_of(host.peer_id)
        self.flat = [t.view(-1) for t in self.tensors]
        self.layout = Layout([t.numel() for t in self.tensors])
        sizes = load_balance(
            self.layout.total, [0.0 if m.client_mode else m.bandwidth for m in group.members], min_size=0
        )
        self.spans = self.layout.spans(sizes)
        self.chunk_elements = max(1, settings.chunk_bytes // 4)
        self.my_chunks = self.layout.chunks(*self.spans[self.index], self.chunk_elements)
        self.loop = asyncio.get_running_loop()
        self.sent_bytes = 0  # encoded bytes we sent, and elements we encoded or decoded: what
        self.converted = 0  # "auto" compression learns the link's rate from
        self.received_bytes = 0  # encoded bytes of the parts and averages we received
        self.failed_peers: dict[int, str] = {}  # member index -> why it was dropped
        self.offenders: dict[PeerID, str] = {}  # members caught sending non-finite values -> why
        # reducer state; a sender is "alive" until it fails, and chunk c of our span is final once
        # every alive sender has delivered it
        self._alive = set(self._expected_senders())
        self._arrived: set[int] = set()
        self._weights: dict[int, float] = {}
        self._capped: dict[int, float] | None = None  # member -> weight after the cap, set at the first chunk
        self._buffers: dict[int, ChunkedBuffer] = {}
        self._prepared: dict[Stream, ChunkedBuffer] = {}  # part streams whose sink was set before they were served
        self._published: ChunkedBuffer | None = None  # our averages, for the senders that read them (sharedmem.py)
        self._into_published = False  # whether we average into it, and copy into our tensors at the end
        self._delivered: dict[int, int] = {}  # sender -> chunks received from it
        self._served = {i: self.loop.create_future() for i in self._alive}  # its averages were received
        self._finalized = 0
        self._progress = asyncio.Event()  # pulsed whenever _finalized grows
        # members that said "pending" (their owner holds the round): waited for as senders up to
        # late_timeout after we start, which leaves the round half its time to finish
        self._pending: set[int] = set()
        self.late_timeout = settings.allreduce_timeout / 2
        self._late_deadline = self.loop.time() + self.late_timeout  # loop time
        self.audit = ReducerAudit(
            self.index,
            weight,
            len(group.members),
            self.flat,
            self.spans,
            self.my_chunks,
            codec,
            settings,
            pool,
            self.slices,
        )
        # we send on one connection per other member (parts, averages or both): each gets its
        # share of `pace` (bytes/s for all of them: uplink_mbps, or what pacing.py learned)
        others = len(group.members) - 1
        self._pace_rate = pace / others if pace and others else None
        self._paced: set[Connection] = set()  # the connections we paced, unpaced when the round ends
        self.sampler = sampler  # TCP's counts of what our connections sent (pacing = "auto")
        self.shared = shared  # buffers shared with peers on this host (sharedmem.py), if we may

    def _piece(self, chunk: Chunk) -> torch.Tensor:
        return self.flat[chunk.tensor][chunk.offset_in_tensor : chunk.offset_in_tensor + chunk.numel]

    def _slot(self, member: int) -> int:
        """Where `member` is counted from us (1 to group size - 1): what our pooled buffers for it
        are keyed by. Member indices change from round to round, and buffers keyed by them would
        pile up to one per index ever seen (twice the model with 2 peers, instead of once)."""
        return (member - self.index) % len(self.group.members)

    def _shared_with(self, connection: Connection) -> SharedBuffers | None:
        """Our shared buffers, where chunks to and from `connection`'s peer may go through them:
        it runs on this host, our link is not sealed, and sharing memory with it did not fail
        lately (sharedmem.py)."""
        shared = self.shared
        if shared is None or not connection.same_host or connection.sealed:
            return None
        return shared if shared.usable(connection.remote_peer) else None

    async def _send_chunk(
        self,
        channel: Channel,
        target: torch.Tensor | None,
        offsets: Sequence[int],
        payload: list[Any],
        data: memoryview,
    ) -> None:
        """Send one encoded chunk: on `channel`, or copied into `target` (the other side's shared
        buffer, laid out by `offsets`) and then its message, without a body, on the stream."""
        if target is None:
            await channel.send(payload, data)
            return
        self._copy_bytes(target[offsets[payload[0]] : offsets[payload[0] + 1]], payload[0], data)
        await channel.stream.send([*payload, SHM])

    def _copy_bytes(self, destination: torch.Tensor, index: int, data: memoryview) -> None:
        """Copy encoded chunk `index` into its place in a shared buffer.

        Raises:
            ValueError: it is not the size of its place.
        """
        if data.nbytes != destination.numel():
            raise ValueError(f"chunk {index} is {data.nbytes} bytes; its place holds {destination.numel()}")
        if data.readonly:
            tensor_bytes(destination)[:] = data
        else:
            self.slices.copy(destination, torch.frombuffer(data, dtype=torch.uint8))

    def _expected_senders(self) -> list[int]:
        if not self.my_chunks:
            return []
        return [i for i in range(len(self.group.members)) if i != self.index]

    def _drop(self, index: int, reason: str) -> None:
        if index not in self.failed_peers:
            self.failed_peers[index] = reason
            logger.warning(
                "Averaging round %s: dropped peer %s (%s); the round goes on without it",
                self.group.group_id.hex()[:8],
                self.group.members[index].peer_id,
                reason,
            )

    def _pace(self, connection: Connection) -> None:
        """Pace our sends on `connection` to its share of the uplink for this round, and count
        what TCP does with them (`sampler`). Its queue at the bottleneck is shared with one flow
        per member: unpaced, they overflow it and the flows that lose packets fall behind."""
        if self.sampler is not None:
            self.sampler.add(connection)
        if self._pace_rate is None or connection in self._paced:
            return
        if connection.set_max_rate(self._pace_rate):
            self._paced.add(connection)

    def _offend(self, index: int, reason: str) -> None:
        self.offenders.setdefault(self.group.members[index].peer_id, reason)

    async def run(self) -> None:
        """Average in place with the group.

        Raises:
            AllreduceError: the round timed out, or every other member failed.
        """
        sampling = self.loop.create_task(self.sampler.run()) if self.sampler is not None else None
        tasks = [self.loop.create_task(self._reduce())]
        for j in range(len(self.group.members)):
            if j != self.index and self.spans[j][1] > self.spans[j][0]:
                if self.group.members[j].peer_id in self.banned:
                    self._drop(j, "it is banned for earlier hostile values; kept local values for its span")
                else:
                    tasks.append(self.loop.create_task(self._exchange_with(j)))
        try:
            async with _timeout(self.settings.allreduce_timeout):
                await asyncio.gather(*tasks)
        except TimeoutError:
            raise AllreduceError(
                f"all-reduce in group {self.group.group_id.hex()[:8]} did not finish within "
                f"allreduce_timeout = {self.settings.allreduce_timeout:g} s"
            ) from None
        finally:
            if sampling is not None:
                sampling.cancel()  # before any await: cancelled again there, we would leave it sampling
            for task in tasks:
                task.cancel()
            try:
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                for connection in self._paced:  # other traffic (a state download) is not ours to pace
                    connection.set_max_rate(None)
                for stream in self._prepared:  # never served: they must not write into the next round's pool
                    stream.body_sink = None
                self._prepared.clear()
                if self.sampler is not None:
                    self.sampler.sample()  # the round's last bytes
        others = len(self.group.members) - 1
        if others and len(self.failed_peers) == others:
            raise AllreduceError(
                f"every other peer of group {self.group.group_id.hex()[:8]} failed: "
                + "; ".join(f"{self.group.members[i].peer_id}: {why}" for i, why in self.failed_peers.items())
            )

    # ---- as a reducer ---------------------------------------------------------------------------

    async def _reduce(self) -> None:
        if not self.my_chunks:
            return

        def no_show(late: bool) -> None:
            if late:
                reason = f"its owner did not let the round go within late_timeout = {self.late_timeout:g} s"
            else:
                reason = f"did not start sending within request_timeout = {self.settings.request_timeout:g} s"
            for i in list(self._alive - self._arrived):
                if late or i not in self._pending:
                    self._fail_sender(i, reason)

        timers = [
            self.loop.call_later(self.settings.request_timeout, no_show, False),
            self.loop.call_at(self._late_deadline, no_show, True),
        ]
        for i in list(self._alive):  # refused at once rather than waited for
            if self.group.members[i].peer_id in self.banned:
                self._fail_sender(i, "it is banned for earlier hostile values; its part is refused")
        try:
            self._finalize_ready_chunks()
            while self._finalized < len(self.my_chunks):
                await self._next_progress()
        finally:
            for timer in timers:
                timer.cancel()
        # averages go out from our tensors (or our published buffer) without a copy: the step ends
        # only once every sender has them
        await asyncio.gather(*self._served.values())
        if self._into_published:  # every reader is done with them: our tensors get them now
            for c in range(self._finalized):
                self.slices.copy(self._piece(self.my_chunks[c]), self._average(c))

    async def _next_progress(self) -> None:
        event = self._progress
        await event.wait()

    def _pulse(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _fail_sender(self, sender: int, reason: str) -> None:
        if sender in self._alive:
            self._alive.discard(sender)
            self._drop(sender, reason)
            if not self._served[sender].done():
                self._served[sender].set_result(None)
            self._finalize_ready_chunks()
            self._pulse()

    def _finalize_ready_chunks(self) -> None:
        """Average every chunk that all alive senders have delivered, in order, into our own
        tensors or our published buffer (`_average`; the averages go back to the senders from
        there). A final chunk stays final whatever happens to anyone later, so it can be
        returned at once."""
        before = self._finalized
        while self._finalized < len(self.my_chunks):
            c = self._finalized
            if any(self._delivered.get(k, 0) <= c for k in self._alive):
                break
            weights = self._capped_weights()
            piece = self._piece(self.my_chunks[c])
            average = self._average(c) if self._into_published else piece
            # our input: the audit reads it in our tensors, or in a copy where the average replaces it now
            self.audit.keep_input(c, piece, sorted(self._alive), copy=not self._into_published)
            if self.settings.aggregation == "mean":
                # a running weighted mean: one fused pass (lerp) per sender, no temporary buffers
                weight, source = weights[self.index], piece
                for k in sorted(self._alive):
                    if weights[k] > 0:
                        weight += weights[k]
                        share = weights[k] / weight
                        self.slices.apply(
                            lambda a, s, d, share=share: torch.lerp(s, d.to(s.dtype), share, out=a),
                            average,
                            source,
                            self._buffers[k].decode(c),
                        )
                        source = average
                        self.converted += piece.numel()
                if source is not average:  # nobody with a weight: our own values
                    self.slices.copy(average, piece)
            else:
                self._robust_chunk(c, piece, weights)
            published = self._published
            if published is not None:
                meta, data = self.codec.encode(average)
                if not self._into_published:  # once, for every sender that reads it there
                    self.converted += piece.numel()
                    self._copy_bytes(published.raw[published.offsets[c] : published.offsets[c + 1]], c, data)
                published.metas[c] = meta
            self._finalized += 1
        if self._finalized > before:
            if self._finalized == len(self.my_chunks) and self.sampler is not None and self._fair_share():
                self.sampler.inputs_arrived()  # every part of our span is here: the rest is ours to send
            self._pulse()

    def _average(self, c: int) -> torch.Tensor:
        """Where chunk c of our span is averaged: our tensors, or where we average into our
        published buffer (`_into_published`), its float32 bytes there."""
        if not self._into_published:
            return self._piece(self.my_chunks[c])
        assert self._published is not None
        return self.codec.decode([], self._published.region(c), self.my_chunks[c].numel)

    def _fair_share(self) -> bool:
        """Whether our span is about as large as the others' on average: with a smaller one (a
        lower `bandwidth` than theirs), their parts of it arrive early whatever our pace, and
        `RoundSampler.lagging` would blame our pace for that."""
        lo, hi = self.spans[self.index]
        return hi - lo >= 0.9 * self.layout.total / len(self.group.members)

    def _capped_weights(self) -> dict[int, float]:
        """Member -> weight after the cap. Computed once, at the first final chunk: by then every
        alive sender has arrived with its weight, so every chunk uses the same weights."""
        if self._capped is None:
            members = [self.index, *sorted(self._weights)]
            raw = [self.weight, *(self._weights[k] for k in members[1:])]
            self._capped = dict(zip(members, cap_weights(raw, self.settings.max_weight_ratio), strict=True))
            for k, w in zip(members, raw, strict=True):
                if self._capped[k] < w:
                    logger.info(
                        "Averaging round %s: capped the weight of peer %s from %g to %g (max_weight_ratio = %g "
                        "times the group's median weight)",
                        self.group.group_id.hex()[:8],
                        self.group.members[k].peer_id,
                        w,
                        self._capped[k],
                        self.settings.max_weight_ratio,
                    )
        return self._capped

    def _robust_chunk(self, c: int, piece: torch.Tensor, weights: dict[int, float]) -> None:
        """Aggregate chunk c by a robust rule into our tensors; weights only exclude zero-weight peers."""
        dtype = torch.promote_types(piece.dtype, torch.float32)  # no sorting or norms in half precision
        values = [piece.to(dtype)] if weights[self.index] > 0 else []
        values += [self._buffers[k].decode(c).to(dtype) for k in sorted(self._alive) if weights[k] > 0]
        if len(values) == 1:
            piece.copy_(values[0])
        elif values:
            s = self.settings
            piece.copy_(aggregate(torch.stack(values), s.aggregation, s.trim_fraction, s.clip_iterations, s.clip_tau))

    def prepare_sender(self, stream: Stream, payload: Any) -> None:
        """Give a member's new part stream the buffer for its part as its body sink, before
        `serve_sender` runs (DecentralizedAverager._part_sink): its first chunks follow the
        request at once. Does nothing for a request `serve_sender` would refuse (`_admit`);
        that one checks everything again."""
        if isinstance(payload, dict) and payload.get("bulk") is True:
            return  # its chunks come on a link of their own
        try:
            sender, _ = self._admit(stream, payload)
        except HiveError:
            return
        if any(other.remote_peer == stream.remote_peer for other in self._prepared):
            return  # one prepared stream per member: serve_sender refuses a second one anyway
        received = self._prepared[stream] = self._part_buffer(sender, stream, payload)
        stream.body_sink = received.sink

    async def serve_sender(self, stream: Stream, payload: Any) -> None:
        """Receive one sender's part and stream the averages back as chunks become final.
        Runs as the handler of the sender's stream."""
        received = self._prepared.pop(stream, None)
        try:
            sender, weight = self._admit(stream, payload)
        except HiveError:
            stream.body_sink = None  # a prepared stream we refuse writes nothing more into the pool
            raise
        self._arrived.add(sender)
        self._weights[sender] = weight
        self._pace(stream.connection)  # our averages go back on it
        if received is None:
            received = self._part_buffer(sender, stream, payload)
        self._buffers[sender] = received
        published = self._publication(stream, payload)
        channel: Channel | None = None
        receiving: asyncio.Task[None] | None = None
        try:
            # the sender waits for our "ready": no chunk arrives before its buffer exists
            channel = await channels.as_reducer(
                self.host,
                stream,
                payload,
                received.sink,
                self.settings.request_timeout,
                received.offer(),
                published.offer() if published is not None else None,
            )
            # the averages go into the sender's shared buffer where it offered one we can map
            shm = "shm" in payload and published is None
            target = self._attach(stream.connection, payload.get("shm"), received) if shm else None
            receiving = self.loop.create_task(self._receive_part(channel, sender, received))
            for c in range(len(self.my_chunks)):
                while self._finalized <= c:
                    if sender not in self._alive:
                        await receiving  # raises why it failed
                        return
                    await self._next_progress()
                if published is not None:  # the average is in our published buffer already
                    self.sent_bytes += published.offsets[c + 1] - published.offsets[c]
                    await stream.send([c, published.metas[c], SHM])
                else:
                    await self._send_chunk(channel, target, received.offsets, *self._encode(c, self._average(c)))
            await receiving
            await self._answer_audit_or_end(stream, sender, published is not None)
            if not self._served[sender].done():
                self._served[sender].set_result(None)
        except asyncio.CancelledError:
            self._fail_sender(sender, "its stream was cancelled")
            raise
        except (HiveError, ValueError, EndOfStream) as e:
            self._fail_sender(sender, str(e) or type(e).__name__)
            raise
        finally:
            if receiving is not None:
                receiving.cancel()
            if channel is not None:
                channel.close()

    def _publication(self, stream: Stream, request: Any) -> ChunkedBuffer | None:
        """Our published averages (sharedmem.py), where this sender reads them: it said it can
        ("read"), it shares memory with us, and we publish this round. We do from the first such
        sender on if two senders or more send to us and no chunk is final yet (none can be
        before this sender's first chunk, which it sends only once our "ready" has come: it
        offered a shared buffer). Whatever the span's size: at 4 x 10K fp32 as at 4 x 50M, the
        copies this spares cost more than the END a reader then sends once it has copied its
        averages out (docs/benchmarks.md)."""
        shared = self._shared_with(stream.connection)
        if shared is None or not (isinstance(request, dict) and request.get("read") is True and "shm" in request):
            return None
        if self._published is None and self._finalized == 0 and len(self._expected_senders()) >= 2:
            nbytes = sum(self.codec.encoded_nbytes(chunk.numel) for chunk in self.my_chunks)
            # by the parity of our rounds: a reader of the last round's never finds this one's there
            key, me = ("avg", shared.rounds % 2), self.host.peer_id.to_bytes()
            buffer = shared.get(key, nbytes, me, published=True)
            if buffer is not None:
                self._published = ChunkedBuffer(self.pool, None, self.my_chunks, self.codec, lambda _: buffer)
                # a float32 mean can be averaged straight into it, our tensors keeping our input
                # until every reader is done: no copy of our input for the audit, nor of the averages
                # into the buffer (each 1/N of the tensors), only one into our tensors at the end
                self._into_published = (
                    isinstance(self.codec, NoCompression)
                    and self.settings.aggregation == "mean"
                    and all(self.flat[chunk.tensor].dtype == torch.float32 for chunk in self.my_chunks)
                )
        return self._published

    def _part_buffer(self, sender: int, stream: Stream, request: Any) -> ChunkedBuffer:
        """Where `sender`'s part of our span is received: pooled by its place from us, or in a
        shared buffer of ours for that peer where its request names one of its own."""
        shared = self._shared_with(stream.connection) if isinstance(request, dict) and "shm" in request else None
        peer = self.group.members[sender].peer_id
        return ChunkedBuffer(
            self.pool,
            ("recv", self._slot(sender)),
            self.my_chunks,
            self.codec,
            (lambda nbytes: shared.get(("recv", peer), nbytes, peer.to_bytes())) if shared is not None else None,
        )

    def _admit(self, stream: Stream, payload: Any) -> tuple[int, float]:
        """The (sender, weight) of a part request we serve.

        Raises:
            HiveError: the request is malformed, not from that member, late, twice, or its
                weight is not a finite number >= 0.
        """
        try:
            sender, weight = int(payload["sender"]), float(payload["weight"])
        except (KeyError, TypeError, ValueError):
            raise HiveError("a part request must carry the sender's index and weight") from None
        if sender not in self._served or self.group.members[sender].peer_id != stream.remote_peer:
            raise HiveError(f"peer {stream.remote_peer} is not member {sender} of this group or sends to no reducer")
        if sender not in self._alive or sender in self._arrived:
            raise HiveError("this part arrived after the reducer stopped waiting for it, or twice")
        if not math.isfinite(weight) or weight < 0:
            raise HiveError(f"weight {weight} must be a finite number >= 0")
        return sender, weight

    async def _answer_audit_or_end(self, stream: Stream, sender: int, reads_published: bool) -> None:
        """After the last average: the sender either ends its stream or asks for an audit.
        Either says it has every average; once we answered the audit, it needs nothing more
        from us. The request ends the sender's side and the answer ours (Stream.send_last: one
        frame each, not two); an older sender's END, which follows the answer, is not waited for.
        A sender that reads our published averages asks for no audit (`_exchange_with`) and
        ends its side only once it has copied them out: until then, that buffer is not ours to
        reuse. One of the builds before that rule asks first, and ends after our answer.

        Raises:
            HiveError: an invalid audit request, something else than the END we wait for, or
                the sender went quiet for next_chunk_timeout.
        """
        try:
            message = await stream.recv(timeout=self.settings.next_chunk_timeout)
        except EndOfStream:
            return  # no audit: it reads our published averages, or verify_reducers is off on its side
        await stream.send_last(self._audit_answer(message.payload))  # and our end, in one frame
        if reads_published:
            try:
                late = await stream.recv(timeout=self.settings.next_chunk_timeout)
            except EndOfStream:
                return
            raise HiveError(f"expected the end of its stream after the audit, got {str(late.payload)[:60]!r}")

    def _audit_answer(self, request: Any) -> dict[str, Any]:
        """Our answer to a sender's audit request (ReducerAudit.answer).

        Raises:
            HiveError: we refuse the request.
        """
        raw = None  # member -> weight as received, for every member the cap was computed over
        if self._capped is not None:
            raw = {k: self.weight if k == self.index else self._weights[k] for k in self._capped}
        return self.audit.answer(request, raw, self._buffers)

    async def _receive_part(self, channel: Channel, sender: int, received: ChunkedBuffer) -> None:
        try:
            for c in range(len(self.my_chunks)):
                message, finite = await channel.recv(
                    self.settings.next_chunk_timeout,
                    lambda payload, body, c=c: all_finite(received.place(c, payload, body)),
                )
                self.received_bytes += len(message.body)
                if not finite:
                    reason = f"it sent a non-finite value (NaN or inf) in chunk {c} of its part"
                    self._offend(sender, reason)
                    raise HostilePeerError(reason)
                self._delivered[sender] = c + 1
                self._finalize_ready_chunks()
        except (HiveError, EndOfStream, ValueError) as e:
            self._fail_sender(sender, str(e) or type(e).__name__)
            raise HiveError(str(e) or type(e).__name__) from None

    # ---- as a sender ----------------------------------------------------------------------------

    async def _exchange_with(self, j: int) -> None:
        member = self.group.members[j]
        chunks = self.layout.chunks(*self.spans[j], self.chunk_elements)
        stream: Stream | None = None
        channel: Channel | None = None
        try:
            self.host.add_addrs(member.peer_id, member.multiaddrs())
            conn = await asyncio.wait_for(self.host.connect(member.peer_id), self.settings.request_timeout)
            self._pace(conn)
            shared = self._shared_with(conn)
            results = ChunkedBuffer(
                self.pool,
                ("result", self._slot(j)),
                chunks,
                self.codec,
                (lambda n: shared.get(("result", member.peer_id), n, member.peer_id.to_bytes())) if shared else None,
            )
            request = self._request(results.offsets[-1], results.offer())
            stream = await conn.open_stream(self.part_method, request, b"")
            # the first chunks go before the reducer's "ready" (at most EAGER_BYTES: what it may
            # have to hold before its buffer exists), so the link is busy during that round trip
            # (parts encode to the same sizes as the averages coming back: `results.offsets`);
            # not on a bulk link, nor where the reducer may name a shared buffer: on one host that
            # round trip is short, and a chunk costs less copied into its buffer than sent
            waits = request.get("bulk") or "shm" in request
            eager = 0 if waits else bisect_right(results.offsets[1 : EAGER_CHUNKS + 1], EAGER_BYTES)
            for i in range(eager):
                await stream.send(*self._encode(i, self._piece(chunks[i])))
            channel = await channels.as_sender(
                self.host,
                stream,
                member.peer_id,
                member.multiaddrs(),
                results.sink,
                self.settings.request_timeout,
                on_pending=lambda: self._on_pending(j),
            )

            # our averages are in the buffer the reducer publishes them in, if it does, and we can
            # map it (first: not mapping its buffer for our part makes us refuse it shared memory)
            unreadable = channel.published is not None and not self._read_published(conn, channel.published, results)
            # our part goes into the reducer's shared buffer where it offered one we can map
            target = self._attach(conn, channel.remote_buffer, results) if "shm" in request else None

            async def send_part() -> None:
                assert channel is not None
                for i in range(eager, len(chunks)):
                    await self._send_chunk(channel, target, results.offsets, *self._encode(i, self._piece(chunks[i])))

            sending = self.loop.create_task(send_part())
            try:
                for i in range(len(chunks)):
                    # the first averaged chunk can only come once every sender has delivered
                    timeout = None if i == 0 else self.settings.next_chunk_timeout
                    message, finite = await channel.recv(
                        timeout,
                        (lambda *_: True)  # their messages only
                        if unreadable
                        else lambda payload, body, i=i: all_finite(results.place(i, payload, body)),
                    )
                    self.converted += 0 if unreadable else chunks[i].numel
                    self.received_bytes += len(message.body)
                    if not finite:
                        raise HostilePeerError(f"it returned a non-finite average (NaN or inf) in chunk {i}")
                await sending
                stream.body_sink = None  # more bodies on the stream are bytes now, never in `results`
                if unreadable:  # our part went into its averages all the same: we end as a sender does
                    await stream.end()
                    stream = None
                    raise HiveError("we cannot map the shared buffer it publishes its averages in")
                if results.published:
                    # no audit of a reducer whose published averages we read: only a process of our
                    # own user can publish a buffer we map (sharedmem.py, "Trust"), and it could
                    # rewrite that buffer after any check of ours, before we copy. Copied out before
                    # our END, after which the reducer may reuse it.
                    self._apply(chunks, results)
                    with contextlib.suppress(HiveError):  # they are ours now, whatever the END meets
                        await stream.end()
                else:
                    if self.settings.verify_reducers:  # before our input is overwritten
                        await self.audit.check(stream, j, chunks, results)
                    # tells the reducer we have everything, so it may reuse its buffers (the audit
                    # request said so already, and ended our side: then this sends nothing)
                    await stream.end()
                stream = None
            finally:
                sending.cancel()
        except (HostilePeerError, AuditFailed) as e:
            self._offend(j, str(e))
            self._drop(j, f"{e}; kept local values for its span")
            return
        except AuditUnanswered as e:
            self._drop(j, f"{e}; kept local values for its span")
            return
        except (HiveError, EndOfStream, ValueError, OSError, asyncio.TimeoutError) as e:
            self._drop(j, f"did not return its averaged part: {e or type(e).__name__}; kept local values there")
            if j in self._pending and j not in self._arrived:  # its part will not come either
                self._fail_sender(j, f"it said its owner held the round, then failed: {e or type(e).__name__}")
            return
        finally:
            if channel is not None:
                channel.close()
            if stream is not None:
                with contextlib.suppress(HiveError):
                    await stream.cancel()
        if not results.published:
            self._apply(chunks, results)

    def _apply(self, chunks: Sequence[Chunk], results: ChunkedBuffer) -> None:
        """Copy a reducer's averages, received and checked, into our tensors."""
        for i, chunk in enumerate(chunks):
            self.slices.copy(self._piece(chunk), results.decode(i))

    def _read_published(self, connection: Connection, offer: Any, results: ChunkedBuffer) -> bool:
        """Read a reducer's averages in the buffer it publishes them in (`offer`), laid out as
        `results`; False where we cannot map it. The reducer writes our averages nowhere else:
        its span then keeps our local values this round, and we offer it no shared memory for a
        while (sharedmem.REFUSAL_MEMORY_S)."""
        shared, peer = self._shared_with(connection), connection.remote_peer
        region = None
        if shared is not None:
            region = shared.attach(offer, results.offsets[-1], results.layout, publisher=peer.to_bytes())
        if region is None:
            if shared is not None:
                shared.refuse(peer)
            return False
        results.read_from(region)
        return True

    def _on_pending(self, j: int) -> float:
        """Member j said "pending": its owner holds the round. Wait for it as a sender too, and
        for its "ready" as long as we would wait for its part (channel.as_sender)."""
        self._pending.add(j)
        return max(0.0, self._late_deadline - self.loop.time()) + self.settings.request_timeout

    def _encode(self, index: int, values: torch.Tensor) -> tuple[list[Any], memoryview]:
        """Chunk `index` of a span (`values`), as the message that carries it: ([index, meta], bytes)."""
        meta, data = self.codec.encode(values)
        self.sent_bytes += data.nbytes
        self.converted += values.numel()
        return [index, meta], data

    def _attach(self, connection: Connection, offer: Any, layout: ChunkedBuffer) -> torch.Tensor | None:
        """The other side's shared buffer that `offer` names, laid out as `layout` (ours for the
        same chunks), to write our chunks into; None, and no offers to that peer for a while,
        where we cannot use it."""
        shared = self._shared_with(connection)
        target = shared.attach(offer, layout.offsets[-1], layout.layout) if shared is not None else None
        if target is None and shared is not None:
            shared.refuse(connection.remote_peer)
        return target

    def _request(self, span_bytes: int, shared: list[str] | None) -> dict[str, Any]:
        # "wait": we understand "pending" (older reducers ignore the field)
        request = {"group_id": self.group.group_id, "sender": self.index, "weight": self.weight, "wait": True}
        if shared is not None:
            # our shared buffer for the averages (sharedmem.py), and we can read them in one the
            # reducer publishes for all its senders instead; older reducers ignore both
            request["shm"], request["read"] = shared, True
        elif wants_bulk_link(self.settings, span_bytes):
            request["bulk"] = True  # a link of our own for the chunks (channel.py), if the reducer can
        return request


class _Entry:
    """One group in the registry: its runner once set up (None: the round is over or will not
    run), and whether our owner holds its scheduled round (True once expected)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.runner: asyncio.Future[AllReduceRunner | None] = loop.create_future()
        self.expected: asyncio.Future[bool] = loop.create_future()


class RunnerRegistry:
    """Finds the runner of a group for part streams that arrive before we set it up.

    A group we are in, whose scheduled round our owner has not let go yet, is `expect`ed: a
    sender that can wait hears "pending" and waits for the runner, however long our owner
    takes (the sender's own bound: AllReduceRunner.late_timeout), or until our step gives up."""

    def __init__(self) -> None:
        self._groups: dict[bytes, _Entry] = {}

    def _entry(self, group_id: bytes) -> _Entry:
        if group_id not in self._groups:
            self._groups[group_id] = _Entry(asyncio.get_running_loop())
        return self._groups[group_id]

    def expect(self, group_id: bytes) -> None:
        expected = self._entry(group_id).expected
        if not expected.done():
            expected.set_result(True)

    def registered(self, group_id: bytes) -> AllReduceRunner | None:
        """The group's runner if it is set up already (no waiting, and no entry made)."""
        entry = self._groups.get(group_id)
        return entry.runner.result() if entry is not None and entry.runner.done() else None

    def register(self, runner: AllReduceRunner) -> None:
        self._entry(runner.group.group_id).runner.set_result(runner)

    def unregister(self, group_id: bytes) -> None:
        """The round is over, or will not run: streams still waiting for it hear so at once."""
        entry = self._groups.pop(group_id, None)
        if entry is not None and not entry.runner.done():
            entry.runner.set_result(None)

    async def find(
        self, group_id: bytes, timeout: float, pending: Callable[[], Awaitable[None]] | None = None
    ) -> AllReduceRunner | None:
        """The group's runner, or None if it is not set up within `timeout`. If the group is
        expected within `timeout` and the sender can wait (`pending` tells it so), until our
        step registers or unregisters it instead."""
        if len(self._groups) > 64 and group_id not in self._groups:
            return None  # someone is making up group ids
        entry = self._entry(group_id)
        waits: set[asyncio.Future[Any]] = {entry.runner}
        if pending is not None:
            waits.add(entry.expected)
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not entry.runner.done() and pending is not None and entry.expected.done():
            await pending()
            await asyncio.wait({entry.runner})  # bounded by our step: it registers or unregisters
        if entry.runner.done():
            return entry.runner.result()
        if self._groups.get(group_id) is entry:
            del self._groups[group_id]
        return None
