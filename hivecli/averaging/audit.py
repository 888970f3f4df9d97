"""Reducer audit (`verify_reducers`, on by default): senders catch a reducer that returns finite
but wrong averages.

AllReduceRunner (allreduce.py) owns one ReducerAudit per round and calls into it at three
points: as a reducer, as each chunk of its span is finalized (`keep_input`) and when a sender
asks for an audit (`answer`); as a sender, once a reducer's whole span has arrived (`check`).

Once a sender has every averaged chunk of reducer j's span, and before it ends the stream or
copies them into its tensors (which still hold its input there), it picks `audit_positions`
random positions of the span (only now, so the reducer could not know which ones to get right)
and sends {"audit": [flat positions]}. The reducer answers with what it aggregated there: the
raw weight (before the cap) of every member the cap was computed over, and for each position
each included member's decoded input, its own first. To answer, a reducer keeps the received
buffers until the round ends and a pooled copy of its own input for its span, taken as each
chunk is finalized (1/N of the tensors), or where it averages into its published buffer
(allreduce.py), reads that input in its tensors, which keep it until the round's end; it
refuses a request that is not exactly `audit_positions` positions in its span.

The sender checks (a) that the claimed weight and input of its own are what it sent
(re-encoded with the codec: exact), and (b) for "mean" and "trimmed_mean" (not CenteredClip,
which mixes a whole chunk) that the claimed inputs, capped and aggregated again, give the
returned average within the codec's error and float rounding (for a lossy codec, the error
bound of the returned chunk's own grid, which the reducer chose). A reducer that fails
(AuditFailed) is treated like one that returned non-finite averages: the sender keeps its
local values for the span, logs one warning naming it, and bans it; one that does not answer
in time (AuditUnanswered) is a failed reducer (local values, no ban).

A sender does not audit a reducer whose published averages it reads in shared memory
(allreduce.py): only a process of its own user can publish a file it maps, and such a process
could rewrite that file between the audit and the copy (sharedmem.py, "Trust").

A sender can verify only its own input: the reducer's own input and what it claims the other
senders sent are its word. The audit thus catches a reducer that returns averages its claimed
inputs do not give, or misstates the auditor's input; one that makes up the other members'
inputs to fit its averages, each audit apart, is not caught. That needs members to first
commit to their inputs (a hash per chunk, sent to every member), so that every claimed input
can be checked.
"""

from __future__ import annotations

import math
import secrets
import struct
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy
import torch

from hivecli._exceptions import HiveError
from hivecli.averaging.compression import (
    Blockwise8BitQuantization,
    Codec,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
)
from hivecli.averaging.partition import Chunk
from hivecli.averaging.robust import cap_weights, trimmed_mean
from hivecli.averaging.settings import AveragingSettings
from hivecli.averaging.slices import SliceWorkers
from hivecli.net.connection import EndOfStream, Stream

if TYPE_CHECKING:
    from hivecli.averaging.buffers import BufferPool


class AuditFailed(HiveError):
    """A reducer's audit answer contradicts our input or its own averages: it is dropped and banned."""


class AuditUnanswered(HiveError):
    """A reducer did not answer a sender's audit (in time, or at all): a failed reducer, not a proven liar."""


class EncodedChunks(Protocol):
    """What the audit reads of a span's encoded chunks (buffers.ChunkedBuffer)."""

    metas: list[Any]

    def region(self, index: int) -> memoryview: ...


class ReducerAudit:
    """One member's part in the audits of one round: as a reducer, the copy of its own input
    and the record of who was aggregated into each chunk, and the answers built from them; as
    a sender, the checks of every other reducer's averages."""

    def __init__(
        self,
        index: int,
        weight: float,
        members: int,
        flat: Sequence[torch.Tensor],
        spans: Sequence[tuple[int, int]],
        my_chunks: Sequence[Chunk],
        codec: Codec,
        settings: AveragingSettings,
        pool: BufferPool,
        slices: SliceWorkers | None = None,
    ):
        self.index, self.weight, self.members, self.flat = index, weight, members, flat
        self.spans, self.my_chunks, self.codec, self.settings = spans, my_chunks, codec, settings
        self.slices = slices if slices is not None else SliceWorkers()
        # as a reducer: for each final chunk, the senders aggregated into it; and a copy of our own
        # input for our span (our tensors get the averages in place), kept until the round ends,
        # taken from the pool only where our tensors do not keep that input (`keep_input`)
        self._keeps = settings.verify_reducers and bool(my_chunks)  # what audits need, to answer them
        self._included: list[list[int]] = []
        self._chunk_starts = [chunk.start for chunk in my_chunks]
        self._own_offsets: list[int] = [0]
        for chunk in my_chunks:  # 8-byte aligned, so that every chunk views as its tensor's dtype
            nbytes = chunk.numel * flat[chunk.tensor].element_size()
            self._own_offsets.append(self._own_offsets[-1] + -(-nbytes // 8) * 8)
        self._pool = pool
        self._own: torch.Tensor | None = None
        self._in_tensors = False  # our input stayed in our tensors this round, not copied (`keep_input`)

    def _input(self, chunk: Chunk) -> torch.Tensor:
        """Our tensors' values at `chunk`."""
        return self.flat[chunk.tensor][chunk.offset_in_tensor : chunk.offset_in_tensor + chunk.numel]

    # ---- as a reducer ---------------------------------------------------------------------------

    def _own_input(self, c: int) -> torch.Tensor:
        """Our input for chunk c of our span, as it was before the round (only with verify_reducers)."""
        assert self._own is not None
        chunk = self.my_chunks[c]
        return self._own[self._own_offsets[c] : self._own_offsets[c + 1]].view(self.flat[chunk.tensor].dtype)[
            : chunk.numel
        ]

    def keep_input(self, c: int, piece: torch.Tensor, included: Sequence[int], copy: bool = True) -> None:
        """Keep the senders aggregated into chunk c of our span (someone may fail later), and a
        copy of our input there (`piece`, about to be replaced by the average) unless not
        `copy`: then our tensors keep it until the round's audits are answered (a reducer that
        averages into its published buffer). Only with verify_reducers."""
        if not self._keeps:
            return
        if copy:
            if self._own is None:
                self._own = self._pool.get(("own",), self._own_offsets[-1])
            self.slices.copy(self._own_input(c), piece)
        self._in_tensors = not copy
        self._included.append(list(included))

    def answer(
        self, request: Any, raw_weights: Mapping[int, float] | None, received: Mapping[int, EncodedChunks]
    ) -> dict[str, Any]:
        """The inputs we aggregated at the requested positions of our span: {"weights": [[member,
        weight as received, before the cap], ...] for every member the cap was computed over,
        "inputs": [[[member, decoded value], ...] for each position]}, our own input first.
        `raw_weights` is None until the cap is computed; `received` holds each sender's chunks.

        Raises:
            HiveError: we keep no inputs (verify_reducers is off here), or the request is not
                exactly `audit_positions` positions inside our span.
        """
        positions = request.get("audit") if isinstance(request, dict) else None
        lo, hi = self.spans[self.index]
        if not self._keeps or raw_weights is None:
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
        where = [bisect_right(self._chunk_starts, p) - 1 for p in positions]
        own = self._own_values(positions, where)
        # per position: the members, and their inputs there (ours first)
        rows: list[tuple[list[int], list[float]]] = [([self.index], [mine]) for mine in own]
        for c, at in _by_chunk(where).items():
            chunk = self.my_chunks[c]
            offsets = [positions[i] - chunk.start for i in at]
            for k in self._included[c]:
                chunks = received[k]
                decoded = _decode_at(self.codec, chunks.metas[c], chunks.region(c), chunk.numel, offsets)
                for i, value in zip(at, decoded, strict=True):
                    rows[i][0].append(k)
                    rows[i][1].append(value)
        weights = [[k, w] for k, w in raw_weights.items()]
        if request.get("packed") is True and self.members <= _MAX_PACKED_MEMBERS:
            return {"weights": weights, **_pack_rows(rows)}
        return {"weights": weights, "inputs": [[[k, v] for k, v in zip(*row, strict=True)] for row in rows]}

    def _own_values(self, positions: Sequence[int], where: Sequence[int]) -> list[float]:
        """Our input at each position of our span (in chunk `where[i]`): one gather per chunk."""
        values = [0.0] * len(positions)
        for c, at in _by_chunk(where).items():
            source = self._input(self.my_chunks[c]) if self._in_tensors else self._own_input(c)
            gathered = _gather(source, [positions[i] - self.my_chunks[c].start for i in at])
            for i, value in zip(at, gathered, strict=True):
                values[i] = float(value)
        return values

    # ---- as a sender ----------------------------------------------------------------------------

    async def check(self, stream: Stream, j: int, chunks: Sequence[Chunk], results: EncodedChunks) -> None:
        """Check reducer j's averages (`results`, its span cut into `chunks`) at random positions
        of its span, chosen only now that they are all here (so it could not have known which
        ones to get right). Our tensors must still hold our input for span j. The request ends
        our side of the stream.

        Raises:
            AuditFailed: the reducer's answer contradicts our input or its own averages.
            AuditUnanswered: it did not answer within next_chunk_timeout, or refused.
        """
        positions = _choose_positions(*self.spans[j], self.settings.audit_positions)
        # "packed": the answer's inputs as bytes (_pack_rows); reducers of step 9 and earlier ignore it
        request = {"audit": positions, "packed": True}
        await stream.send_last(request)  # ends our side too
        try:
            reply = await stream.recv(timeout=self.settings.next_chunk_timeout)
        except (HiveError, EndOfStream) as e:
            raise AuditUnanswered(f"did not answer the audit of its span: {e or type(e).__name__}") from None
        problem = self._problem(j, chunks, results, positions, reply.payload)
        if problem is not None:
            raise AuditFailed(f"its averages failed the audit: {problem}")

    def _problem(
        self, j: int, chunks: Sequence[Chunk], results: EncodedChunks, positions: Sequence[int], reply: Any
    ) -> str | None:
        """What in reducer j's audit answer does not match, or None. It must (a) claim our input
        and our weight as we sent them, and (b) for the per-position rules, return what its
        claimed inputs give, within the codec's error and float rounding."""
        parsed = _parse_audit_answer(reply, len(positions), self.members)
        if isinstance(parsed, str):
            return parsed
        raw, inputs = parsed
        if raw.get(self.index) != self.weight:
            return f"it claims our weight was {raw.get(self.index)!r}, we sent {self.weight!r}"
        capped = dict(zip(raw, cap_weights(list(raw.values()), self.settings.max_weight_ratio), strict=True))
        starts = [chunk.start for chunk in chunks]
        where = [bisect_right(starts, p) - 1 for p in positions]  # chunk index of each position
        mine: dict[int, float] = {}  # position -> our input as the reducer decoded it
        returned_at: dict[int, float] = {}  # position -> the average it returned there (not for CenteredClip)
        aggregation, codec, me = self.settings.aggregation, self.codec, self.index
        for i, at in _by_chunk(where).items():
            ours = [positions[k] for k in at]
            offsets = [p - chunks[i].start for p in ours]
            mine.update(zip(ours, _encoded_values(codec, self._input(chunks[i]), offsets), strict=True))
            if aggregation != "centered_clip":
                returned = _decode_at(codec, results.metas[i], results.region(i), chunks[i].numel, offsets)
                returned_at.update(zip(ours, returned, strict=True))
        # one loop per position, its lookups hoisted: it ran for every reducer in every round
        fp16 = isinstance(codec, Float16Compression)
        epsilons: dict[int, float] = {}  # chunk -> the rounding of its tensor's dtype, float32's at least
        for p, claimed, i in zip(positions, inputs, where, strict=True):
            if claimed.get(me) != mine[p]:  # both went through the same codec: exact
                return f"at position {p} it claims our input was {claimed.get(me)!r}, we sent {mine[p]!r}"
            if j not in claimed or not claimed.keys() <= raw.keys():
                return f"at position {p} its inputs {sorted(claimed)} are not members it reported weights for"
            if aggregation == "centered_clip":
                continue  # CenteredClip mixes the whole chunk: a position alone cannot be recomputed
            returned, offset = returned_at[p], p - chunks[i].start
            codec_error = _codec_error(codec, results.metas[i], results.region(i), offset, returned)
            if codec_error is None:
                continue  # a codec we know no bound for
            largest = 0.0  # the largest claimed input, in magnitude
            for value in claimed.values():
                largest = max(largest, abs(value))
            expected = self._recompute(j, claimed, capped)
            if fp16:
                expected = max(-_FP16_MAX, min(_FP16_MAX, expected))  # the return trip clamps to fp16's range
            # the reducer rounds in its tensors' dtype (and float32 on the wire) at each of its steps
            eps = epsilons.get(i)
            if eps is None:
                eps = epsilons[i] = max(torch.finfo(self.flat[chunks[i].tensor].dtype).eps, _FP32_EPS)
            magnitude = max(abs(expected), abs(returned), largest)
            slack = 8 * (len(claimed) + 1) * eps * magnitude + 1e-30
            if not abs(returned - expected) <= codec_error + slack:
                return (
                    f"at position {p} it returned {returned!r}, but the inputs it claims give {expected!r} "
                    f"(tolerance {codec_error + slack:.3g})"
                )
        return None

    def _recompute(self, j: int, claimed: dict[int, float], capped: dict[int, float]) -> float:
        """The aggregate of the claimed inputs at one position, as reducer j computes it."""
        if self.settings.aggregation == "mean":
            return _weighted_mean(claimed, capped, j)
        values = [v for k, v in claimed.items() if capped[k] > 0]
        if not values:
            return claimed[j]  # nobody with a weight: the reducer keeps its own value
        return float(trimmed_mean(torch.tensor(values, dtype=torch.float64)[:, None], self.settings.trim_fraction)[0])


def _weighted_mean(claimed: dict[int, float], capped: dict[int, float], j: int) -> float:
    """The mean of the claimed inputs at one position by their capped weights, as reducer j
    computes it (to float rounding: it lerps in float32; the audit's slack covers both); its
    own value where nobody has a weight."""
    total = weighted = 0.0
    for k, value in claimed.items():
        weight = capped[k]
        if weight > 0:
            total += weight
            weighted += weight * value
    return weighted / total if total > 0 else claimed[j]


def _by_chunk(where: Sequence[int]) -> dict[int, list[int]]:
    """{chunk: the indices i with where[i] == chunk}: positions grouped by the chunk they are in."""
    grouped: dict[int, list[int]] = {}
    for i, chunk in enumerate(where):
        grouped.setdefault(chunk, []).append(i)
    return grouped


def _choose_positions(lo: int, hi: int, count: int) -> list[int]:
    """`count` random flat positions in [lo, hi), distinct where the span has room for them.

    Drawn from os.urandom (unpredictable, unlike `random`), 8 bytes per position, in one call
    per batch rather than SystemRandom's one per draw. The modulo's bias is below span / 2**64.
    """
    span, chosen = hi - lo, []
    while len(chosen) < count:
        batch = secrets.token_bytes(8 * count)
        for i in range(count):
            position = lo + int.from_bytes(batch[8 * i : 8 * i + 8], "little") % span
            if (span < count or position not in chosen) and len(chosen) < count:
                chosen.append(position)
    return chosen


_FP16_MAX = torch.finfo(torch.float16).max
_FP32_EPS = torch.finfo(torch.float32).eps


def _decode_one(codec: Codec, meta: Any, data: memoryview, numel: int, offset: int) -> float:
    """Element `offset` of an encoded chunk, bit for bit what `codec.decode` gives there, without
    decoding the whole chunk where the codec allows (an audit reads a few values of chunks of
    millions); the codecs that send values as they are take `_decode_at`'s one gather instead.

    Raises:
        ValueError: `meta` or `data` is malformed.
    """
    if isinstance(codec, Uniform8BitQuantization):  # one grid for the chunk: the byte alone decodes
        return float(codec.decode(meta, data[offset : offset + 1], 1)[0])
    if isinstance(codec, Blockwise8BitQuantization):  # the byte and its block's scale
        blocks, block = -(-numel // codec.block), offset // codec.block
        one = bytes(data[4 * block : 4 * block + 4]) + bytes(data[4 * blocks + offset : 4 * blocks + offset + 1])
        return float(codec.decode(meta, memoryview(one), 1)[0])
    return float(codec.decode(meta, data, numel)[offset])


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)  # those .numpy() views (not bfloat16)


def _gather(tensor: torch.Tensor, offsets: Sequence[int]) -> list[float]:
    """tensor[offsets] as Python floats (exact): through a numpy view where there is one, which
    costs a few microseconds where torch's indexing and its index tensor cost tens."""
    if tensor.dtype in _NUMPY_DTYPES:
        return tensor.detach().numpy()[list(offsets)].tolist()  # type: ignore[no-any-return]
    return [float(v) for v in tensor[torch.tensor(offsets, dtype=torch.long)].tolist()]


def _decode_at(codec: Codec, meta: Any, data: memoryview, numel: int, offsets: Sequence[int]) -> list[float]:
    """Elements `offsets` of an encoded chunk, each bit for bit what `codec.decode` gives there:
    for the codecs that send values as they are, in one gather; for the others, one by one
    (`_decode_one`).

    Raises:
        ValueError: `meta` or `data` is malformed.
    """
    if isinstance(codec, NoCompression | Float16Compression) and offsets:
        size = 4 if isinstance(codec, NoCompression) else 2
        if min(offsets) < 0 or (max(offsets) + 1) * size > data.nbytes:
            raise ValueError(f"a position of {list(offsets)[:8]} is outside a chunk of {data.nbytes} bytes")
        values = numpy.frombuffer(data, dtype=numpy.float32 if size == 4 else numpy.float16, count=data.nbytes // size)
        return values[list(offsets)].tolist()  # type: ignore[no-any-return]
    return [_decode_one(codec, meta, data, numel, offset) for offset in offsets]


def _encoded_values(codec: Codec, piece: torch.Tensor, offsets: Sequence[int]) -> list[float]:
    """What a receiver decodes at `offsets` of `piece` once we encode the piece as one chunk;
    only the part of the chunk each value's encoding depends on is encoded.

    Raises:
        ValueError: the codec's own encoding does not decode (a broken codec).
    """
    if isinstance(codec, NoCompression) and piece.dtype == torch.float32:
        return _gather(piece, offsets)  # float32 goes on the wire as it is: nothing to encode
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
    elif isinstance(codec, NoCompression | Float16Compression):  # value by value, gathered in one op
        sub, at = piece[torch.tensor(offsets)], list(range(len(offsets)))
    else:
        sub, at = piece, list(offsets)
    meta, data = codec.encode(sub)  # one call: on a busy machine every small torch op costs
    return _decode_at(codec, meta, data, sub.numel(), at)


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


_MAX_PACKED_MEMBERS = 1 << 16  # member indices are uint16 in a packed answer; larger groups get lists


def _pack_rows(rows: Sequence[tuple[list[int], list[float]]]) -> dict[str, Any]:
    """An answer's inputs in the packed form a sender asks for with "packed": per position, how
    many members (`counts`); then every member index (uint16) and every value (float64, exact
    for every dtype and codec we decode), little-endian, row after row. Eight positions of four
    members were forty lists, which every frame's structure check walks."""
    members = [k for row in rows for k in row[0]]
    values = [v for row in rows for v in row[1]]
    return {
        "counts": [len(row[0]) for row in rows],
        "members": struct.pack(f"<{len(members)}H", *members),
        "values": struct.pack(f"<{len(values)}d", *values),
    }


def _unpack_rows(answer: dict[str, Any], positions: int, members: int) -> list[dict[int, float]] | None:
    """The per-position inputs of a packed answer (`_pack_rows`), or None if they are malformed."""
    counts, packed_members, packed_values = answer.get("counts"), answer.get("members"), answer.get("values")
    if not (isinstance(counts, list) and len(counts) == positions):
        return None
    if not all(type(n) is int and 1 <= n <= members for n in counts):
        return None
    total = sum(counts)
    if not (isinstance(packed_members, bytes) and len(packed_members) == 2 * total):
        return None
    if not (isinstance(packed_values, bytes) and len(packed_values) == 8 * total):
        return None
    ks = struct.unpack(f"<{total}H", packed_members)
    vs = struct.unpack(f"<{total}d", packed_values)
    rows, at = [], 0
    for n in counts:
        row = dict(zip(ks[at : at + n], vs[at : at + n], strict=True))
        at += n
        if len(row) != n or max(row) >= members or not all(map(math.isfinite, row.values())):
            return None  # a member twice, no such member, or a value that is not finite
        rows.append(row)
    return rows


def _parse_audit_answer(answer: Any, positions: int, members: int) -> _Claims | str:
    """(member -> raw weight, [member -> value] per position) from a reducer's audit answer,
    packed (`_pack_rows`) or as lists (reducers of step 9 and earlier), or what is malformed in it."""

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
    if raw is None:
        return "its answer has no valid weights"
    if "counts" in answer:
        packed = _unpack_rows(answer, positions, members)
        return (raw, packed) if packed is not None else "its answer's packed inputs are malformed"
    rows = answer.get("inputs")
    if not isinstance(rows, list) or len(rows) != positions:
        return "its answer has not one row of inputs per position"
    inputs = [pairs(row) for row in rows]
    if any(row is None for row in inputs):
        return "its answer has a malformed row of inputs"
    return raw, [row for row in inputs if row is not None]
