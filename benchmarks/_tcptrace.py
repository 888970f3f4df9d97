"""Congestion-window collapses of a benchmark's TCP connections, from the kernel's tracepoints.

bench_wan.py --trace (as root) uses it to tell rounds in which one of the peers' connections lost
its congestion window from the others. A collapse is a connection whose window fell below
COLLAPSE_CWND packets after it had grown (its slow-start threshold above MIN_SSTHRESH). "Quiet"
collapses are those that no retransmission by the same host preceded within RETRANSMIT_S: no
loss explains them. On 100 Mbit/s links they cost a round about 0.25 s: the connection sends
next to nothing until its window has grown again, and its pace (its share of the uplink) leaves
it no way to catch up (docs/benchmarks.md, "cwnd collapses").

It reads the `tcp:tcp_probe` tracepoint (every segment a socket receives, with its window),
filtered in the kernel to small windows, and `tcp:tcp_retransmit_skb`. The tracepoints are
global: `CwndTrace` keeps the events between the addresses under `prefix` (the lab's subnet),
and puts the tracing settings it changed back when it stops.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass

TRACEFS = "/sys/kernel/tracing"
COLLAPSE_CWND = 8  # packets
MIN_SSTHRESH = 40  # packets: the window had grown (a new connection's threshold is 2^31 - 1)
SAME_COLLAPSE_S = 0.3  # events of one socket closer than this belong to one collapse
RETRANSMIT_S = 0.5  # a retransmission this long before a collapse may explain it
BUFFER_KB = 65536  # per CPU: the filter keeps the events few

_PROBE = re.compile(r"(\d+\.\d+): tcp_probe: .*?src=(\d+\.\d+\.\d+\.\d+):\d+ dest=(\d+\.\d+\.\d+\.\d+):\d+")
_RETRANSMIT = re.compile(r"(\d+\.\d+): tcp_retransmit_skb: .*? saddr=(\d+\.\d+\.\d+\.\d+) daddr=")


@dataclass(frozen=True)
class Collapse:
    time: float  # unix time of the first small window seen
    src: str  # the sending host's address
    dst: str
    quiet: bool  # no retransmission by `src` within RETRANSMIT_S before it


class CwndTrace:
    """Collects collapses between `start` and `stop`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._saved: dict[str, str] = {}
        self._offset = 0.0  # unix time - trace clock (CLOCK_MONOTONIC)

    @staticmethod
    def unavailable() -> str | None:
        """Why the trace cannot run here, or None."""
        if os.geteuid() != 0:
            return "not root"
        if not os.path.isdir(f"{TRACEFS}/events/tcp/tcp_probe"):
            subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, check=False)
        if not os.path.isdir(f"{TRACEFS}/events/tcp/tcp_probe"):
            return f"no tcp_probe tracepoint under {TRACEFS}"
        return None

    def _write(self, name: str, value: str) -> None:
        path = f"{TRACEFS}/{name}"
        if name not in self._saved:
            with open(path) as f:
                current = f.read().strip()
            if name == "trace_clock":  # "[local] global mono ...": the bracketed one is in use
                current = re.search(r"\[(\w+)\]", current).group(1)  # type: ignore[union-attr]
            elif name.endswith("/filter") and current == "none":
                current = "0"
            self._saved[name] = current
        with open(path, "w") as f:
            f.write(value)

    def start(self) -> None:
        """Raises OSError where tracefs refuses a setting."""
        self._write("tracing_on", "0")
        self._write("trace_clock", "mono")
        self._write("buffer_size_kb", str(BUFFER_KB))
        with open(f"{TRACEFS}/trace", "w") as f:
            f.write("")
        small = f"snd_cwnd < {COLLAPSE_CWND} && ssthresh > {MIN_SSTHRESH} && ssthresh < 1000000"
        self._write("events/tcp/tcp_probe/filter", small)
        self._write("events/tcp/tcp_probe/enable", "1")
        self._write("events/tcp/tcp_retransmit_skb/enable", "1")
        self._offset = time.time() - time.monotonic()
        self._write("tracing_on", "1")

    def stop(self) -> list[Collapse]:
        """The collapses since `start`; puts the settings back."""
        with open(f"{TRACEFS}/tracing_on", "w") as f:
            f.write("0")
        with open(f"{TRACEFS}/trace") as f:
            lines = f.readlines()
        for name, value in reversed(list(self._saved.items())):
            with open(f"{TRACEFS}/{name}", "w") as f:
                f.write(value)
        self._saved.clear()
        return collapses_in(lines, self.prefix, self._offset)


def collapses_in(lines: list[str], prefix: str, offset: float) -> list[Collapse]:
    """The collapses in the text of a trace (`lines`) between addresses that start with `prefix`;
    `offset` turns the trace's clock into unix time."""
    retransmits: dict[str, list[float]] = {}
    last: dict[tuple[str, str], float] = {}
    collapses = []
    for line in lines:
        if (m := _RETRANSMIT.search(line)) and m.group(2).startswith(prefix):
            retransmits.setdefault(m.group(2), []).append(float(m.group(1)))
        elif (m := _PROBE.search(line)) and m.group(2).startswith(prefix):
            at, key = float(m.group(1)), (m.group(2), m.group(3))
            if key not in last or at - last[key] > SAME_COLLAPSE_S:
                quiet = not any(at - RETRANSMIT_S <= t <= at for t in retransmits.get(key[0], []))
                collapses.append(Collapse(at + offset, key[0], key[1], quiet))
            last[key] = at
    return collapses
