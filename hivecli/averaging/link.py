"""What a peer's recent rounds say about its link, and the plan a group's leader makes from it.

A round's leader decides, for every member, how the round travels (`RoundPlan`, sent with the
group): the chunk size, and with compression "auto" the codec. Both depend on the link:

- Chunks. A message is sent whole, so a control message (a reducer's "ready", an audit)
  queued behind a chunk waits for all of it: 8 MiB chunks on a 100 Mbit/s link held the other
  direction idle for most of a second per round (0.61-0.75 of the link rate; 1 MiB chunks:
  0.84-0.94). On loopback small chunks cost per-message overhead instead (2 peers x 50M:
  159 ms with 8 MiB, 194 ms with 1 MiB). So a chunk is what one stream carries in
  `CHUNK_SECONDS` (the link's rate shared by the streams to the group's other members), between
  `MIN_CHUNK_BYTES` and the averager's `chunk_bytes`.
- The codec: see compression.AutoCompression.

Each member also decides for itself whether its spans take bulk links (`bulk_links = "auto"`,
`spans_take_bulk_links`): where the link is faster than one event loop moves bytes and the
machine has the cores to drive it from worker threads.

The rate is what this peer measured: bytes it sent over the round's seconds, less the time the
round spent converting (a round slowed by conversions on a fast link is not a slow link),
smoothed over rounds. Every member of a round shares the slowest member's pace, so the leader's
own measurement speaks for the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHUNK_SECONDS = 0.05
MIN_CHUNK_BYTES = 256 * 1024
MAX_PLANNED_CHUNK_BYTES = 64 * 1024 * 1024  # a leader's plan beyond this is refused (the frame limit)
# bulk_links = "auto": all-reduce spans take bulk links where a peer has at least this many cores
# (its share of the machine), once our rounds measured our link at least this fast. Measured
# (docs/benchmarks.md): on 16 cores they made 4 x 50M fp32 on loopback 1.9x faster (276 -> 147
# ms) and 2 x 50M 1.5x (217 -> 140 ms); with one core per peer they were slower than the stream
# (2 peers on 2 cores; 4 peers on 4 cores, 4 x 50M: 320 against 261 ms), as each side's threads
# and the event loop then share that core; over 100 Mbit/s they were slower too (a fresh
# connection per round restarts TCP's slow start, and bulk links are not paced), and a link that
# slow is not limited by the event loop. Not before a round measured the link: dialing a peer
# that cannot be reached directly (behind NAT, a firewall that drops the attempt) would cost
# that round the dial's timeout, where the stream was fine.
AUTO_BULK_MIN_CORES = 4
AUTO_BULK_MIN_RATE = 300e6  # bytes/s: 2.4 Gbit/s, well above what a WAN link carries


@dataclass(frozen=True)
class RoundPlan:
    """How a round travels, chosen by its leader: `codec` (only with compression "auto"; None:
    each member's own) and `chunk_bytes` (None: each member's own setting)."""

    codec: str | None = None
    chunk_bytes: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"codec": self.codec, "chunk_bytes": self.chunk_bytes}

    @classmethod
    def from_wire(cls, data: Any) -> RoundPlan:
        """Raises ValueError if `data` is not a plan this peer can follow."""
        if not isinstance(data, dict) or set(data) - {"codec", "chunk_bytes"}:
            raise ValueError("a round plan must be {codec, chunk_bytes}")
        codec, chunk_bytes = data.get("codec"), data.get("chunk_bytes")
        if codec is not None and not (isinstance(codec, str) and len(codec) <= 32):
            raise ValueError("a round plan's codec must be a short name")
        if chunk_bytes is not None and not (
            isinstance(chunk_bytes, int)
            and not isinstance(chunk_bytes, bool)
            and 4096 <= chunk_bytes <= MAX_PLANNED_CHUNK_BYTES
        ):
            raise ValueError(f"a round plan's chunk_bytes must be 4096..{MAX_PLANNED_CHUNK_BYTES} bytes")
        return cls(codec, chunk_bytes)


def spans_take_bulk_links(rate: float | None, cores: int, paced: bool) -> bool:
    """What `bulk_links = "auto"` does with a round's all-reduce spans: True (as "all") with at
    least AUTO_BULK_MIN_CORES `cores` for this peer (its share of the machine), a link `rate`
    (bytes/s, LinkMeter.rate; None: not yet measured) of at least AUTO_BULK_MIN_RATE, and no
    pacing (`paced`: `uplink_mbps`, or what pacing = "auto" learned, which only the stream's
    sockets obey); else False (as "state")."""
    fast = rate is not None and rate >= AUTO_BULK_MIN_RATE
    return cores >= AUTO_BULK_MIN_CORES and fast and not paced


class LinkMeter:
    """This peer's link rate as its recent rounds measured it (bytes per second)."""

    min_bytes = 1 << 20  # a round that sends less is all latency: it says nothing of the link
    smoothing = 0.3  # weight of the newest round

    def __init__(self) -> None:
        self.rate: float | None = None

    def observe(self, sent_bytes: int, seconds: float, busy_seconds: float = 0.0) -> None:
        """Learn from a finished round that sent `sent_bytes` in `seconds`, `busy_seconds` of
        which went to converting tensors (compression)."""
        if sent_bytes < self.min_bytes or seconds <= 0:
            return
        rate = sent_bytes / max(seconds - busy_seconds, 0.2 * seconds)
        self.rate = rate if self.rate is None else self.rate + self.smoothing * (rate - self.rate)

    def chunk_bytes(self, ceiling: int, streams: int = 1) -> int:
        """The chunk size for our link shared by `streams` streams at once (a peer sends to every
        other member of its group): what each carries in CHUNK_SECONDS, within
        [MIN_CHUNK_BYTES, ceiling], a multiple of 4096; `ceiling` until a round is measured."""
        if self.rate is None:
            return ceiling
        size = int(self.rate * CHUNK_SECONDS / max(1, streams)) // 4096 * 4096
        return max(min(MIN_CHUNK_BYTES, ceiling), min(size, ceiling))
