"""Butterfly all-reduce: every member reduces one span of the flattened tensors.

Each sender opens one stream to each reducer, waits for its "ready" (sent once the reducer
has a buffer for it, so that no chunk is ever parked in memory on the way), and sends it that
reducer's span of its own tensors, chunk by chunk, as raw codec bytes that land straight in
that buffer. As soon as every sender has delivered chunk c, the reducer averages it and sends
it back on the same streams, while later chunks are still arriving: sending, receiving,
reducing and returning all overlap, and every stream runs at once.

Faults: a sender that does not open its stream within `request_timeout`, or goes quiet for
`next_chunk_timeout`, is dropped; the chunks not yet final are averaged over those still
alive (each chunk is the weighted mean of the peers that delivered it, and every survivor
gets the same values). A reducer that fails leaves its span at the sender's local values.
Averages are applied to the tensors only once a whole span has arrived, so a half-received
part is never used.

Hostile members: a reducer drops a sender whose chunk holds a NaN or an infinity, and caps
every weight at `max_weight_ratio` times the median (robust.py); `aggregation` can replace
the weighted mean by a trimmed mean or CenteredClip. A sender keeps its local values for the
span of a reducer that returns a non-finite average. Both kinds of offenders end up in
`offenders`, which the averager bans for `ban_duration`; banned members are neither served
nor sent to (their spans keep local values).

Reducer audit (`verify_reducers`, on by default): a reducer that returns finite but wrong
averages is caught by the senders. Once a sender has every averaged chunk of reducer j's
span, and before it ends the stream or copies them into its tensors (which still hold its
input there), it picks `audit_positions` random positions of the span (only now, so the
reducer could not know which ones to get right) and sends {"audit": [flat positions]}. The
reducer answers with what it aggregated there: the raw weight (before the cap) of every
member the cap was computed over, and for each position each included member's decoded
input, its own first. To answer, a reducer keeps the received buffers until the round ends
and a pooled copy of its own input for its span, taken as each chunk is finalized (1/N of the
tensors); it refuses a request that is not exactly `audit_positions` positions in its span.
The sender checks (a) that the claimed weight and input of its own are what it sent
(re-encoded with the codec: exact), and (b) for "mean" and "trimmed_mean" (not CenteredClip,
which mixes a whole chunk) that the claimed inputs, capped and aggregated again, give the
returned average within the codec's error and float rounding (for a lossy codec, the error
bound of the returned chunk's own grid, which the reducer chose). A reducer that fails is
treated like one that returned non-finite averages: the sender keeps its local values for
the span, logs one warning naming it, and adds it to `offenders`; one that does not answer
in time is a failed reducer (local values, no ban). A sender can verify only its own input:
the reducer's own input and what it claims the other senders sent are its word. The audit
thus catches a reducer that returns averages its claimed inputs do not give, or misstates the
auditor's input; one that makes up the other members' inputs to fit its averages, each audit
apart, is not caught. That needs members to first commit to their inputs (a hash per chunk,
sent to every member), so that every claimed input can be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from bisect import bisect_right
from collections.abc import Collection, Sequence
from typing import Any

import torch

from hivecli._exceptions import AllreduceError, HiveError
from hivecli.averaging.compression import (
    Blockwise8BitQuantization,
    Codec,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    tensor_bytes,
)
from hivecli.averaging.group import GroupInfo
from hivecli.averaging.partition import Chunk, Layout, load_balance
from hivecli.averaging.robust import aggregate, all_finite, cap_weights, trimmed_mean
from hivecli.averaging.settings import AveragingSettings
from hivecli.net.connection import EndOfStream, Stream
from hivecli.net.host import Host
from hivecli.net.identity import PeerID

logger = logging.getLogger(__name__)

PART_METHOD = "avg.part"
READY = "ready"


class HostilePeerError(HiveError):
    """A peer sent values no honest peer sends (NaN or infinity, or averages its own audit
    contradicts); it is dropped and banned."""


class _AuditUnanswered(HiveError):
    """A reducer did not answer a sender's audit (in time, or at all): a failed reducer, not a proven liar."""


class BufferPool:
    """Byte buffers kept between rounds: fresh memory costs a page fault per 4 KiB, which
    for a large model takes longer than sending it over loopback."""

    def __init__(self) -> None:
        self._buffers: dict[Any, torch.Tensor] = {}

    def get(self, key: Any, nbytes: int) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes]

    def clear(self) -> None:
        self._buffers.clear()


class _ChunkedBuffer:
    """Encoded bytes of a sequence of chunks, back to back, each addressable by index."""

    def __init__(self, pool: BufferPool, key: Any, chunks: Sequence[Chunk], codec: Codec):
        self.chunks, self.codec = chunks, codec
        self.offsets = [0]
        for chunk in chunks:
            self.offsets.append(self.offsets[-1] + codec.encoded_nbytes(chunk.numel))
        self.raw = pool.get(key, self.offsets[-1])
        self.view = tensor_bytes(self.raw) if self.offsets[-1] else memoryview(b"")
        self.metas: list[Any] = [None] * len(chunks)

    def region(self, index: int) -> memoryview:
        return self.view[self.offsets[index] : self.offsets[index + 1]]

    def sink(self, payload: Any, nbytes: int) -> memoryview | None:
        valid = isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], int)
        return self.region(payload[0]) if valid and 0 <= payload[0] < len(self.chunks) else None

    def place(self, expected: int, payload: Any, body: bytes | memoryview) -> torch.Tensor:
        """Check one received message, copy its body in place if the sink did not, and decode it.

        Raises:
            ValueError: out of order, wrong size, or undecodable.
        """
        if not (isinstance(payload, list) and len(payload) == 2 and payload[0] == expected):
            raise ValueError(f"expected chunk {expected}, got {str(payload)[:60]!r}")
        region = self.region(expected)
        if body is not region:
            if len(body) != region.nbytes:
                raise ValueError(f"chunk {expected} has {len(body)} bytes, expected {region.nbytes}")
            region[:] = body
        self.metas[expected] = payload[1]
        return self.decode(expected)

    def decode(self, index: int) -> torch.Tensor:
        return self.codec.decode(self.metas[index], self.region(index), self.chunks[index].numel)


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
    ):
        self.host, self.group, self.tensors = host, group, list(tensors)
        self.banned = set(banned)
        self.weight, self.codec, self.settings, self.pool = weight, codec, settings, pool
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
        self.failed_peers: dict[int, str] = {}  # member index -> why it was dropped
        self.offenders: dict[PeerID, str] = {}  # members caught sending non-finite values -> why
        # reducer state; a sender is "alive" until it fails, and chunk c of our span is final once
        # every alive sender has delivered it
        self._alive = set(self._expected_senders())
        self._arrived: set[int] = set()
        self._weights: dict[int, float] = {}
        self._capped: dict[int, float] | None = None  # member -> weight after the cap, set at the first chunk
        self._buffers: dict[int, _ChunkedBuffer] = {}
        self._delivered: dict[int, int] = {}  # sender -> chunks received from it
        self._served = {i: self.loop.create_future() for i in self._alive}  # its averages were received
        self._finalized = 0
        self._progress = asyncio.Event()  # pulsed whenever _finalized grows
        # audit state: for each final chunk, the senders aggregated into it; and a copy of our own
        # input for our span (our tensors get the averages in place), kept until the round ends
        self._included: list[list[int]] = []
        self._chunk_starts = [chunk.start for chunk in self.my_chunks]
        self._own_offsets: list[int] = [0]
        self._own: torch.Tensor | None = None
        if settings.verify_reducers and self.my_chunks:
            for chunk in self.my_chunks:  # 8-byte aligned, so that every chunk views as its tensor's dtype
                nbytes = chunk.numel * self.tensors[chunk.tensor].element_size()
                self._own_offsets.append(self._own_offsets[-1] + -(-nbytes // 8) * 8)
            self._own = pool.get(("own",), self._own_offsets[-1])

    def _piece(self, chunk: Chunk) -> torch.Tensor:
        return self.flat[chunk.tensor][chunk.offset_in_tensor : chunk.offset_in_tensor + chunk.numel]

    def _own_input(self, c: int) -> torch.Tensor:
        """Our input for chunk c of our span, as it was before the round (only with verify_reducers)."""
        assert self._own is not None
        chunk = self.my_chunks[c]
        return self._own[self._own_offsets[c] : self._own_offsets[c + 1]].view(self.tensors[chunk.tensor].dtype)[
            : chunk.numel
        ]

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

    def _offend(self, index: int, reason: str) -> None:
        self.offenders.setdefault(self.group.members[index].peer_id, reason)

    async def run(self) -> None:
        """Average in place with the group.

        Raises:
            AllreduceError: the round timed out, or every other member failed.
        """
        tasks = [self.loop.create_task(self._reduce())]
        for j in range(len(self.group.members)):
            if j != self.index and self.spans[j][1] > self.spans[j][0]:
                if self.group.members[j].peer_id in self.banned:
                    self._drop(j, "it is banned for earlier hostile values; kept local values for its span")
                else:
                    tasks.append(self.loop.create_task(self._exchange_with(j)))
        try:
            async with asyncio.timeout(self.settings.allreduce_timeout):
                await asyncio.gather(*tasks)
        except TimeoutError:
            raise AllreduceError(
                f"all-reduce in group {self.group.group_id.hex()[:8]} did not finish within "
                f"allreduce_timeout = {self.settings.allreduce_timeout:g} s"
            ) from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
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

        def no_show() -> None:
            reason = f"did not start sending within request_timeout = {self.settings.request_timeout:g} s"
            for i in list(self._alive - self._arrived):
                self._fail_sender(i, reason)

        timer = self.loop.call_later(self.settings.request_timeout, no_show)
        for i in list(self._alive):  # refused at once rather than waited for
            if self.group.members[i].peer_id in self.banned:
                self._fail_sender(i, "it is banned for earlier hostile values; its part is refused")
        try:
            self._finalize_ready_chunks()
            while self._finalized < len(self.my_chunks):
                await self._next_progress()
        finally:
            timer.cancel()
        # averages go out from our tensors without a copy: the step ends only once every sender has them
        await asyncio.gather(*self._served.values())

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
        tensors (the averages go back to the senders from there). A final chunk stays final
        whatever happens to anyone later, so it can be returned at once."""
        before = self._finalized
        while self._finalized < len(self.my_chunks):
            c = self._finalized
            if any(self._delivered.get(k, 0) <= c for k in self._alive):
                break
            weights = self._capped_weights()
            piece = self._piece(self.my_chunks[c])
            if self._own is not None:  # an audit asks for our input after the average replaced it
                self._own_input(c).copy_(piece)
            self._included.append(sorted(self._alive))  # who is in this chunk: someone may fail later
            if self.settings.aggregation == "mean":
                # a running weighted mean: one fused pass (lerp) per sender, no temporary buffers
                weight = weights[self.index]
                for k in sorted(self._alive):
                    if weights[k] > 0:
                        weight += weights[k]
                        piece.lerp_(self._buffers[k].decode(c).to(piece.dtype), weights[k] / weight)
            else:
                self._robust_chunk(c, piece, weights)
            self._finalized += 1
        if self._finalized > before:
            self._pulse()

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

    async def serve_sender(self, stream: Stream, payload: Any) -> None:
        """Receive one sender's part and stream the averages back as chunks become final.
        Runs as the handler of the sender's stream."""
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
        self._arrived.add(sender)
        self._weights[sender] = weight
        received = self._buffers[sender] = _ChunkedBuffer(self.pool, ("recv", sender), self.my_chunks, self.codec)
        stream.body_sink = received.sink
        receiving = self.loop.create_task(self._receive_part(stream, sender, received))
        try:
            await stream.send(READY)  # the sender waits for this: no chunk arrives before its buffer exists
            for c, chunk in enumerate(self.my_chunks):
                while self._finalized <= c:
                    if sender not in self._alive:
                        await receiving  # raises why it failed
                        return
                    await self._next_progress()
                meta, data = self.codec.encode(self._piece(chunk))
                await stream.send([c, meta], data)
            await receiving
            await self._answer_audit_or_end(stream, sender)
            if not self._served[sender].done():
                self._served[sender].set_result(None)
        except asyncio.CancelledError:
            self._fail_sender(sender, "its stream was cancelled")
            raise
        except (HiveError, ValueError) as e:
            self._fail_sender(sender, str(e) or type(e).__name__)
            raise
        finally:
            receiving.cancel()

    async def _answer_audit_or_end(self, stream: Stream, sender: int) -> None:
        """After the last average: the sender either ends its stream (it has everything) or
        first asks for an audit, which we answer before waiting for its end.

        Raises:
            HiveError: an invalid audit request, or the sender went quiet for next_chunk_timeout.
        """
        try:
            message = await stream.recv(timeout=self.settings.next_chunk_timeout)
        except EndOfStream:
            return  # no audit: verify_reducers is off on the sender's side
        await stream.send(self._audit_answer(message.payload))
        with contextlib.suppress(EndOfStream):  # its end of stream says it has checked every average
            await stream.recv(timeout=self.settings.next_chunk_timeout)

    def _audit_answer(self, request: Any) -> dict[str, Any]:
        """The inputs we aggregated at the requested positions of our span: {"weights": [[member,
        weight as received, before the cap], ...] for every member the cap was computed over,
        "inputs": [[[member, decoded value], ...] for each position]}, our own input first.

        Raises:
            HiveError: we keep no inputs (verify_reducers is off here), or the request is not
                exactly `audit_positions` positions inside our span.
        """
        positions = request.get("audit") if isinstance(request, dict) else None
        lo, hi = self.spans[self.index]
        if self._own is None or self._capped is None:
            raise HiveError("this reducer keeps no inputs to audit (verify_reducers = False here)")
        if not (
            isinstance(positions, list)
            and len(positions) == self.settings.audit_positions
            and all(type(p) is int and lo <= p < hi for p in positions)
        ):
            raise HiveError(
                f"an audit must name exactly audit_positions = {self.settings.audit_positions} positions in "
                f"[{lo}, {hi}), got {str(request)[:60]!r}"
            )
        raw = {k: self.weight if k == self.index else self._weights[k] for k in self._capped}
        inputs = []
        for p in positions:
            c = bisect_right(self._chunk_starts, p) - 1
            chunk = self.my_chunks[c]
            offset = p - chunk.start
            row = [[self.index, float(self._own_input(c)[offset])]]
            for k in self._included[c]:
                received = self._buffers[k]
                row.append([k, _decode_one(self.codec, received.metas[c], received.region(c), chunk.numel, offset)])
            inputs.append(row)
        return {"weights": [[k, w] for k, w in raw.items()], "inputs": inputs}

    async def _receive_part(self, stream: Stream, sender: int, received: _ChunkedBuffer) -> None:
        try:
            for c in range(len(self.my_chunks)):
                message = await stream.recv(timeout=self.settings.next_chunk_timeout)
                if not all_finite(received.place(c, message.payload, message.body)):
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
        results = _ChunkedBuffer(self.pool, ("result", j), chunks, self.codec)
        stream: Stream | None = None
        try:
            self.host.add_addrs(member.peer_id, member.multiaddrs())
            conn = await asyncio.wait_for(self.host.connect(member.peer_id), self.settings.request_timeout)
            stream = await conn.open_stream(PART_METHOD, self._request(), b"")
            stream.body_sink = results.sink
            ready = await stream.recv(timeout=2 * self.settings.request_timeout)
            if ready.payload != READY:
                raise ValueError(f"expected {READY!r} from the reducer, got {str(ready.payload)[:40]!r}")

            async def send_part() -> None:
                for i, chunk in enumerate(chunks):
                    meta, data = self.codec.encode(self._piece(chunk))
                    await stream.send([i, meta], data)

            sending = self.loop.create_task(send_part())
            try:
                for i in range(len(chunks)):
                    # the first averaged chunk can only come once every sender has delivered
                    timeout = None if i == 0 else self.settings.next_chunk_timeout
                    message = await stream.recv(timeout=timeout)
                    if not all_finite(results.place(i, message.payload, message.body)):
                        raise HostilePeerError(f"it returned a non-finite average (NaN or inf) in chunk {i}")
                await sending
                if self.settings.verify_reducers:
                    await self._audit(stream, j, chunks, results)
                await stream.end()  # tells the reducer we have everything: it may reuse its buffers
                stream = None
            finally:
                sending.cancel()
        except HostilePeerError as e:
            self._offend(j, str(e))
            self._drop(j, f"{e}; kept local values for its span")
            return
        except _AuditUnanswered as e:
            self._drop(j, f"{e}; kept local values for its span")
            return
        except (HiveError, EndOfStream, ValueError, OSError, asyncio.TimeoutError) as e:
            self._drop(j, f"did not return its averaged part: {e or type(e).__name__}; kept local values there")
            return
        finally:
            if stream is not None:
                with contextlib.suppress(HiveError):
                    await stream.cancel()
        for i, chunk in enumerate(chunks):
            self._piece(chunk).copy_(results.decode(i))

    async def _audit(self, stream: Stream, j: int, chunks: Sequence[Chunk], results: _ChunkedBuffer) -> None:
        """Check reducer j's averages at random positions of its span, chosen only now that they
        are all here (so it could not have known which ones to get right). Our tensors still
        hold our input for span j: the results are copied in only after this.

        Raises:
            HostilePeerError: the reducer's answer contradicts our input or its own averages.
            _AuditUnanswered: it did not answer within next_chunk_timeout, or refused.
        """
        lo, hi = self.spans[j]
        count, rng = self.settings.audit_positions, secrets.SystemRandom()  # unpredictable, unlike random's
        if hi - lo >= count:
            positions = rng.sample(range(lo, hi), count)
        else:
            positions = [rng.randrange(lo, hi) for _ in range(count)]
        await stream.send({"audit": positions})
        try:
            reply = await stream.recv(timeout=self.settings.next_chunk_timeout)
        except (HiveError, EndOfStream) as e:
            raise _AuditUnanswered(f"did not answer the audit of its span: {e or type(e).__name__}") from None
        problem = self._audit_problem(j, chunks, results, positions, reply.payload)
        if problem is not None:
            raise HostilePeerError(f"its averages failed the audit: {problem}")

    def _audit_problem(
        self, j: int, chunks: Sequence[Chunk], results: _ChunkedBuffer, positions: Sequence[int], reply: Any
    ) -> str | None:
        """What in reducer j's audit answer does not match, or None. It must (a) claim our input
        and our weight as we sent them, and (b) for the per-position rules, return what its
        claimed inputs give, within the codec's error and float rounding."""
        parsed = _parse_audit_answer(reply, len(positions), len(self.group.members))
        if isinstance(parsed, str):
            return parsed
        raw, inputs = parsed
        if raw.get(self.index) != self.weight:
            return f"it claims our weight was {raw.get(self.index)!r}, we sent {self.weight!r}"
        capped = dict(zip(raw, cap_weights(list(raw.values()), self.settings.max_weight_ratio), strict=True))
        starts = [chunk.start for chunk in chunks]
        where = [bisect_right(starts, p) - 1 for p in positions]  # chunk index of each position
        mine: dict[int, float] = {}  # position -> our input as the reducer decoded it
        for i in set(where):
            ours = [p for p, at in zip(positions, where, strict=True) if at == i]
            sent = _encoded_values(self.codec, self._piece(chunks[i]), [p - chunks[i].start for p in ours])
            mine.update(zip(ours, sent, strict=True))
        for p, claimed, i in zip(positions, inputs, where, strict=True):
            chunk, offset = chunks[i], p - chunks[i].start
            if claimed.get(self.index) != mine[p]:  # both went through the same codec: exact
                return f"at position {p} it claims our input was {claimed.get(self.index)!r}, we sent {mine[p]!r}"
            if j not in claimed or not claimed.keys() <= raw.keys():
                return f"at position {p} its inputs {sorted(claimed)} are not members it reported weights for"
            if self.settings.aggregation == "centered_clip":
                continue  # CenteredClip mixes the whole chunk: a position alone cannot be recomputed
            returned = _decode_one(self.codec, results.metas[i], results.region(i), chunk.numel, offset)
            codec_error = _codec_error(self.codec, results.metas[i], results.region(i), offset, returned)
            if codec_error is None:
                continue  # a codec we know no bound for
            expected = self._recompute(j, claimed, capped)
            if isinstance(self.codec, Float16Compression):
                expected = max(-_FP16_MAX, min(_FP16_MAX, expected))  # the return trip clamps to fp16's range
            # the reducer rounds in its tensors' dtype (and float32 on the wire) at each of its steps
            eps = max(torch.finfo(self.tensors[chunk.tensor].dtype).eps, _FP32_EPS)
            magnitude = max(abs(expected), abs(returned), *(abs(v) for v in claimed.values()))
            slack = 8 * (len(claimed) + 1) * eps * magnitude + 1e-30
            if not abs(returned - expected) <= codec_error + slack:
                return (
                    f"at position {p} it returned {returned!r}, but the inputs it claims give {expected!r} "
                    f"(tolerance {codec_error + slack:.3g})"
                )
        return None

    def _recompute(self, j: int, claimed: dict[int, float], capped: dict[int, float]) -> float:
        """The aggregate of the claimed inputs at one position, as reducer j computes it."""
        values = [v for k, v in claimed.items() if capped[k] > 0]
        if not values:
            return claimed[j]  # nobody with a weight: the reducer keeps its own value
        if self.settings.aggregation == "mean":
            total = sum(capped[k] for k in claimed if capped[k] > 0)
            return sum(capped[k] * v for k, v in claimed.items() if capped[k] > 0) / total
        return float(trimmed_mean(torch.tensor(values, dtype=torch.float64)[:, None], self.settings.trim_fraction)[0])

    def _request(self) -> dict[str, Any]:
        return {"group_id": self.group.group_id, "sender": self.index, "weight": self.weight}


_FP16_MAX = torch.finfo(torch.float16).max
_FP32_EPS = torch.finfo(torch.float32).eps


def _decode_one(codec: Codec, meta: Any, data: memoryview, numel: int, offset: int) -> float:
    """Element `offset` of an encoded chunk, bit for bit what `codec.decode` gives there, without
    decoding the whole chunk (an audit reads a few values of chunks of millions).

    Raises:
        ValueError: `meta` or `data` is malformed.
    """
    if isinstance(codec, NoCompression | Float16Compression):
        size = 4 if isinstance(codec, NoCompression) else 2
        return float(codec.decode(meta, data[size * offset : size * (offset + 1)], 1)[0])
    if isinstance(codec, Uniform8BitQuantization):  # one grid for the chunk: the byte alone decodes
        return float(codec.decode(meta, data[offset : offset + 1], 1)[0])
    if isinstance(codec, Blockwise8BitQuantization):  # the byte and its block's scale
        blocks, block = -(-numel // codec.block), offset // codec.block
        one = bytes(data[4 * block : 4 * block + 4]) + bytes(data[4 * blocks + offset : 4 * blocks + offset + 1])
        return float(codec.decode(meta, memoryview(one), 1)[0])
    return float(codec.decode(meta, data, numel)[offset])


def _encoded_values(codec: Codec, piece: torch.Tensor, offsets: Sequence[int]) -> list[float]:
    """What a receiver decodes at `offsets` of `piece` once we encode the piece as one chunk;
    only the part of the chunk each value's encoding depends on is encoded.

    Raises:
        ValueError: the codec's own encoding does not decode (a broken codec).
    """
    if isinstance(codec, Uniform8BitQuantization):  # the chunk's min and max set the grid: keep them
        low, high = torch.aminmax(piece.to(torch.float32))
        sub = torch.stack([*(piece[o].to(torch.float32) for o in offsets), low, high])
        at = list(range(len(offsets)))
    elif isinstance(codec, Blockwise8BitQuantization):  # each block is encoded on its own scale
        size = codec.block
        blocks = sorted({o // size for o in offsets})
        # the blocks side by side; only the chunk's last block can be short, and it comes last:
        # padded with zeros, as the codec pads it, so that every scale stays the same
        sub = torch.cat([piece[b * size : (b + 1) * size] for b in blocks])
        sub = torch.nn.functional.pad(sub.to(torch.float32), (0, len(blocks) * size - sub.numel()))
        at = [blocks.index(o // size) * size + o % size for o in offsets]
    elif isinstance(codec, NoCompression | Float16Compression):  # value by value
        sub, at = torch.stack([piece[o] for o in offsets]), list(range(len(offsets)))
    else:
        sub, at = piece, list(offsets)
    meta, data = codec.encode(sub)  # one call: on a busy machine every small torch op costs
    return [_decode_one(codec, meta, data, sub.numel(), a) for a in at]


def _codec_error(codec: Codec, meta: Any, data: memoryview, offset: int, value: float) -> float | None:
    """A bound on |decoded - encoded| for the value decoded at `offset` of a chunk, from what
    the chunk itself carries; None for a codec we know no bound for."""
    if isinstance(codec, NoCompression):
        return 0.0
    if isinstance(codec, Float16Compression):  # half an fp16 ulp, or half the subnormal step
        return abs(value) * 2**-10 + 2**-24
    if isinstance(codec, Uniform8BitQuantization):  # half a grid step, plus float32 rounding of low + code * step
        low, scale = float(meta[0]), float(meta[1])
        return abs(scale) / 2 + 4 * _FP32_EPS * (abs(low) + 256 * abs(scale))
    if isinstance(codec, Blockwise8BitQuantization):  # half a step of the value's block
        block = offset // codec.block
        scale = float(torch.frombuffer(bytearray(data[4 * block : 4 * block + 4]), dtype=torch.float32)[0])
        return abs(scale) / 2 + 4 * _FP32_EPS * 128 * abs(scale)
    return None


_Claims = tuple[dict[int, float], list[dict[int, float]]]  # member -> raw weight; per position, member -> value


def _parse_audit_answer(answer: Any, positions: int, members: int) -> _Claims | str:
    """(member -> raw weight, [member -> value] per position) from a reducer's audit answer, or
    what is malformed in it."""

    def pairs(rows: Any) -> dict[int, float] | None:
        if not isinstance(rows, list):
            return None
        found: dict[int, float] = {}
        for row in rows:
            if not (isinstance(row, list) and len(row) == 2 and type(row[0]) is int and 0 <= row[0] < members):
                return None
            if row[0] in found or type(row[1]) not in (int, float) or not math.isfinite(row[1]):
                return None
            found[row[0]] = float(row[1])
        return found

    if not isinstance(answer, dict):
        return f"its answer {str(answer)[:60]!r} is not an audit answer"
    raw = pairs(answer.get("weights"))
    rows = answer.get("inputs")
    if raw is None or not isinstance(rows, list) or len(rows) != positions:
        return "its answer has no valid weights or not one row of inputs per position"
    inputs = [pairs(row) for row in rows]
    if any(row is None for row in inputs):
        return "its answer has a malformed row of inputs"
    return raw, [row for row in inputs if row is not None]


class RunnerRegistry:
    """Finds the runner of a group for part streams that arrive before we set it up."""

    def __init__(self) -> None:
        self._runners: dict[bytes, asyncio.Future[AllReduceRunner]] = {}

    def _slot(self, group_id: bytes) -> asyncio.Future[AllReduceRunner]:
        if group_id not in self._runners:
            self._runners[group_id] = asyncio.get_running_loop().create_future()
        return self._runners[group_id]

    def register(self, runner: AllReduceRunner) -> None:
        self._slot(runner.group.group_id).set_result(runner)

    def unregister(self, group_id: bytes) -> None:
        self._runners.pop(group_id, None)

    async def find(self, group_id: bytes, timeout: float) -> AllReduceRunner | None:
        if len(self._runners) > 64 and group_id not in self._runners:
            return None  # someone is making up group ids
        slot = self._slot(group_id)
        try:
            return await asyncio.wait_for(asyncio.shield(slot), timeout)
        except asyncio.TimeoutError:
            if not slot.done():
                self._runners.pop(group_id, None)
            return None
