"""Where a WAN round's time goes: a peer's link use over the round, from its byte counters.

Run as a script inside a peer's namespace (bench_wan.py --trace does), it samples the link's
transmitted-byte counter every SAMPLE_S seconds until SIGTERM, then writes "unix_time tx_bytes"
lines to the output file:

    python benchmarks/_linkuse.py DEVICE OUTPUT

`split_round` then cuts one peer's round into three parts, with the link counted busy in a
WINDOW_S window that carried at least BUSY_SHARE of the link rate:

- start: from the round's start to the first busy window (matchmaking, the first round trips);
- middle: from there to the last busy window, with the share of the link rate it used;
- tail: from the last busy window to the round's end (the last averages, the audit's round
  trip, and waiting for slower peers).
"""

from __future__ import annotations

import signal
import sys
import time
from bisect import bisect_right
from typing import Any

SAMPLE_S = 0.01
WINDOW_S = 0.05
BUSY_SHARE = 0.5


def sample(device: str, output: str) -> None:
    """Sample `device`'s tx_bytes until SIGTERM, then write the samples to `output`."""
    stopped = False

    def stop(*_: Any) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    path = f"/sys/class/net/{device}/statistics/tx_bytes"
    rows = []
    while not stopped:
        with open(path) as f:
            rows.append(f"{time.time():.4f} {f.read().strip()}\n")
        time.sleep(SAMPLE_S)
    with open(output, "w") as f:
        f.writelines(rows)


def load(path: str) -> list[tuple[float, int]]:
    with open(path) as f:
        return [(float(t), int(b)) for t, b in (line.split() for line in f if line.strip())]


def split_round(samples: list[tuple[float, int]], start: float, end: float, rate_bps: float) -> dict[str, float]:
    """{"start", "middle", "tail": seconds, "use": the middle's share of the link rate} of one
    peer's round from `start` to `end` (unix times); all 0 if the samples do not cover it."""
    times = [t for t, _ in samples]

    def sent_at(t: float) -> int:  # the counter at the last sample at or before t
        return samples[max(0, bisect_right(times, t) - 1)][1]

    if not samples or times[0] > start or times[-1] < end:
        return {"start": 0.0, "middle": 0.0, "tail": 0.0, "use": 0.0}
    busy = []
    t = start
    while t + WINDOW_S <= end:
        if (sent_at(t + WINDOW_S) - sent_at(t)) * 8 >= BUSY_SHARE * rate_bps * WINDOW_S:
            busy.append(t)
        t += WINDOW_S
    if not busy:
        return {"start": end - start, "middle": 0.0, "tail": 0.0, "use": 0.0}
    first, last = busy[0], busy[-1] + WINDOW_S
    use = (sent_at(last) - sent_at(first)) * 8 / (rate_bps * (last - first))
    return {"start": first - start, "middle": last - first, "tail": end - last, "use": use}


if __name__ == "__main__":
    sample(sys.argv[1], sys.argv[2])
