"""How a group splits the work: which peer reduces which span of the flattened tensors, and
how each span is cut into chunks on the wire.

Every member computes the same answer from the same inputs (tensor sizes, the group's peer
order and bandwidths), so no plan is ever sent over the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hivecli._exceptions import ConfigError


def load_balance(total: int, bandwidths: Sequence[float | None], min_size: int = 0) -> list[int]:
    """Split `total` elements among peers in proportion to their bandwidth.

    A bandwidth of 0 marks a client (it sends but reduces nothing); None means "the same as
    everyone else". Shares smaller than `min_size` are given to the others, so that no peer
    pays a round trip for a handful of elements. Returns one size per peer, summing to `total`.

    Raises:
        ConfigError: a negative bandwidth, or every peer is a client.
    """
    if any(b is not None and b < 0 for b in bandwidths):
        raise ConfigError(f"bandwidths {list(bandwidths)} must be >= 0 (0 marks a client that only sends)")
    weights = [1.0 if b is None else float(b) for b in bandwidths]
    if not any(weights):
        raise ConfigError("every peer in the group is a client (bandwidth 0); someone has to reduce")
    while True:
        scale = total / sum(weights)
        sizes = [int(w * scale) for w in weights]
        too_small = [i for i, (w, size) in enumerate(zip(weights, sizes, strict=True)) if w and size < min_size]
        if not too_small or len([w for w in weights if w]) == 1:
            break
        weights[min(too_small, key=lambda i: weights[i])] = 0.0
    # hand out the rounding remainder one element at a time, largest fractional part first
    remainder = total - sum(sizes)
    order = sorted(range(len(weights)), key=lambda i: (weights[i] * scale - sizes[i], weights[i]), reverse=True)
    for i in order[:remainder]:
        sizes[i] += 1
    return sizes


@dataclass(frozen=True)
class Chunk:
    """Elements [start, end) of the flattened tensors, all inside tensor `tensor`."""

    tensor: int
    start: int  # flat index
    end: int
    offset_in_tensor: int

    @property
    def numel(self) -> int:
        return self.end - self.start


class Layout:
    """The flattened view of a list of tensor sizes: spans and their chunks."""

    def __init__(self, numels: Sequence[int]):
        self.numels = list(numels)
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.total = self.offsets[-1]

    def spans(self, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """[start, end) of each peer's part, given the sizes from `load_balance`."""
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        return bounds

    def chunks(self, start: int, end: int, max_elements: int) -> list[Chunk]:
        """Cut [start, end) at tensor boundaries and then every `max_elements`, so that each
        chunk is one contiguous slice of one tensor (sent without a gathering copy)."""
        result: list[Chunk] = []
        for index, (t_start, t_end) in enumerate(zip(self.offsets, self.offsets[1:], strict=False)):
            lo, hi = max(start, t_start), min(end, t_end)
            for c_start in range(lo, hi, max_elements):
                c_end = min(c_start + max_elements, hi)
                result.append(Chunk(index, c_start, c_end, c_start - t_start))
        return result
