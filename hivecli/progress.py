"""How far a run has come, counted over all its peers, and the thread that reports it.

`RunCounter` counts the samples each peer has trained on in this run: a grow-only counter
(a G-counter, as in CRDTs), where merging keeps each peer's largest count and the run's total
is the sum. Peers learn each other's counts from progress reports in the DHT, a joiner gets the
whole counter with the run's state, and a peer keeps it in its checkpoints; so the total never
forgets a peer that has left, and never counts one twice.

`ProgressReporter` is a background thread: every report period it publishes this peer's
progress (and, every few minutes, the run's announcement) and reads the others'. The training
thread only reads its results: a dead or slow peer delays a report, never a training step.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

from hivecli._exceptions import HiveError
from hivecli.cores import fair_share
from hivecli.dht.dht import DHT
from hivecli.rundir import run_started
from hivecli.runs import fetch_progress, publish_progress
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
MAX_COUNTER_PEERS = 4096  # entries kept in a counter; beyond, the smallest are dropped (undercounting)


class RunCounter:
    """Samples trained on per peer, for one run. Thread-safe."""

    def __init__(self, counts: dict[str, int] | None = None):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._sum = 0  # sum(self._counts.values()), kept up to date: the total is read at every step
        self._reported_total = 0  # the largest total another peer has reported
        if counts:
            self.merge(counts)

    def add(self, peer: str, samples: int) -> None:
        with self._lock:
            self._counts[peer] = self._counts.get(peer, 0) + samples
            self._sum += samples

    def merge(self, counts: Any, reported_total: Any = None) -> None:
        """Take in another peer's view: each peer's largest count wins. Entries that are not
        {str: non-negative int} are ignored (the data comes from the network)."""
        if not isinstance(counts, dict):
            return
        with self._lock:
            for peer, count in counts.items():
                valid = isinstance(peer, str) and len(peer) <= 128 and isinstance(count, int)
                if valid and count > self._counts.get(peer, 0):
                    self._sum += count - self._counts.get(peer, 0)
                    self._counts[peer] = count
            if len(self._counts) > MAX_COUNTER_PEERS:
                kept = sorted(self._counts.items(), key=lambda item: item[1])[-MAX_COUNTER_PEERS:]
                self._counts = dict(kept)
                self._sum = sum(self._counts.values())
            if isinstance(reported_total, int) and reported_total > self._reported_total:
                self._reported_total = reported_total

    def of(self, peer: str) -> int:
        with self._lock:
            return self._counts.get(peer, 0)

    @property
    def total(self) -> int:
        """The run's samples as far as this peer knows. A total reported by another peer counts
        too: it may include peers that left before we could see their reports."""
        with self._lock:
            return max(self._sum, self._reported_total)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


MAX_SPEED = 1e9  # samples/s beyond which a reported speed is not believed (it would end the run at once)


def is_live(record: dict[str, Any], now: float, period: float) -> bool:
    """A progress record from a peer that is still training: recent, and not a goodbye."""
    stamp = record.get("time")
    fresh = isinstance(stamp, (int, float)) and 0 <= now - stamp <= max(10.0, 4 * period)
    return fresh and not record.get("left")


def speed_of(record: dict[str, Any]) -> float:
    speed = record.get("samples_per_s")
    return float(speed) if isinstance(speed, (int, float)) and 0 <= speed < MAX_SPEED else 0.0


MAX_STEPS_PER_SECOND = 1000  # faster than any real peer trains: a step beyond it is a lie


def plausible_step(run_id: str, live_steps: list[int], now: float) -> int | None:
    """The highest step a donor's state may claim: a donor is a stranger, and step 10**12 would
    end a joiner's training at once. Bounded by what the run could have trained since its id
    was stamped (UTC, signed by the run's owner) at MAX_STEPS_PER_SECOND, and by twice the
    median step of the run's live peers (a majority of liars is needed to raise it). None
    when there is nothing to go by."""
    bounds = []
    started = run_started(run_id)
    if started is not None:
        bounds.append(int(max(0.0, now - started) * MAX_STEPS_PER_SECOND) + 1000)
    if live_steps:
        ordered = sorted(live_steps)
        bounds.append(2 * max(0, ordered[(len(ordered) - 1) // 2]) + 1000)
    return min(bounds) if bounds else None


def others_records(dht: DHT, prefix: str, run_id: str) -> dict[str, dict[str, Any]]:
    """{peer id: latest progress record} of the other peers of run `run_id`: not this peer's own
    (perhaps from before a crash), nor those an earlier run with the same prefix left behind."""
    me = str(dht.peer_id)
    return {p: r for p, r in fetch_progress(dht, prefix).items() if p != me and r.get("run_id") == run_id}


def merge_records(counter: RunCounter, records: dict[str, dict[str, Any]]) -> None:
    """Take the sample counts that other peers report into `counter`."""
    for peer, record in records.items():
        if isinstance(record.get("samples"), int):
            counter.merge({peer: record["samples"]}, record.get("run_samples"))


class ProgressReporter:
    """Publishes this peer's progress every `period` seconds on a thread of its own, and keeps
    what it learns of the run: `peers` (live peers, this one included), `run_samples_per_s`.

    Args:
        dht: the peer's DHT.
        prefix: the run's prefix.
        run_id: the run's id (records of other runs with the same prefix are ignored).
        period: seconds between reports.
        progress: returns this peer's progress record (called on the reporter's thread).
        counter: merged with the counts the other peers report.
        announce: publishes the run's announcement; called every `announce_period` seconds.
    """

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        run_id: str,
        period: float,
        progress: Callable[[], dict[str, Any]],
        counter: RunCounter,
        announce: Callable[[], None],
        announce_period: float = 120.0,
    ):
        self.dht, self.prefix, self.run_id, self.period = dht, prefix, run_id, period
        self._progress, self.counter, self._announce = progress, counter, announce
        self.announce_period = announce_period
        self.peers = 1
        self.run_samples_per_s = 0.0
        self.reports = 0  # finished report passes (tests wait on this)
        self.fair_share: tuple[int, int] | None = None  # (peers on this machine, our cores): hivecli.cores
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hive-progress", daemon=True)

    @property
    def _ttl(self) -> float:
        """How long a progress record lives: a few report periods (a dead peer's goes soon)."""
        return max(30.0, 5 * self.period)

    def start(self) -> None:
        self._thread.start()

    def report_now(self) -> None:
        """Ask for a report as soon as possible (after an eval, a rollback, a loaded state)."""
        self._wake.set()

    def _loop(self) -> None:
        # The run is announced here, on the first pass, and its first progress record follows at
        # once: whoever sees the announcement soon sees a live peer of the run as well.
        announced = -math.inf
        while not self._stop.is_set():
            self._wake.clear()
            now = get_dht_time()
            try:
                if now - announced >= self.announce_period:
                    self._announce()
                    announced = now
                self._report(now)
            except HiveError as e:
                logger.debug("Could not report progress to the DHT: %s", e)
            except Exception:  # a reporting bug must not end the run; it is logged once per pass
                logger.exception("Progress report failed")
            try:  # counted here, off the training thread: it reads the process table
                self.fair_share = fair_share()
            except Exception as e:
                logger.debug("Could not count the hive peers on this machine: %s", e)
            self.reports += 1
            self._wake.wait(self.period)

    def _report(self, now: float) -> None:
        record = self._progress()
        publish_progress(self.dht, self.prefix, record, ttl=self._ttl)
        others = others_records(self.dht, self.prefix, self.run_id)
        merge_records(self.counter, others)
        live = [r for r in others.values() if is_live(r, now, self.period)]
        self.peers, self.run_samples_per_s = 1 + len(live), speed_of(record) + sum(speed_of(r) for r in live)

    def stop(self, goodbye: bool = True) -> None:
        """Stop the thread; with `goodbye`, publish a last record saying this peer left (so the
        others stop counting it at once instead of when its record expires)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)  # a pass in flight ends with its DHT call's timeout
        if goodbye:
            try:
                publish_progress(self.dht, self.prefix, {**self._progress(), "left": True}, ttl=self._ttl)
            except Exception as e:  # leaving must not fail on a DHT hiccup
                logger.debug("Could not publish the goodbye record: %s", e)


CURVE_POINTS = 128  # points of a peer's whole-run curve in its progress record (a few KB packed)


class Curve:
    """A peer's whole-run training curve in at most `capacity` points, for its progress record:
    `hive monitor` joins a run at any time and still draws it from the start.

    Points are kept at a stride that doubles whenever the curve is full (every other point is
    dropped), so the curve always spans the whole run, evenly, however long it lasts. Thread-
    safe: the training thread adds, the reporter's thread reads.
    """

    def __init__(self, capacity: int = CURVE_POINTS):
        if capacity < 2:
            raise ValueError(f"a curve needs a capacity of at least 2 points, not {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._points: list[list[Any]] = []
        self._stride = 1  # keep one point in `_stride` offered
        self._offered = 0

    def add(self, time: float, step: int, loss: float | None, accuracy: float | None, samples_per_s: float) -> None:
        with self._lock:
            self._offered += 1
            if (self._offered - 1) % self._stride:
                return
            self._points.append([round(time, 2), step, loss, accuracy, samples_per_s])
            if len(self._points) >= self.capacity:
                self._points = self._points[::2]
                self._stride *= 2

    def points(self) -> list[list[Any]]:
        """[[time, step, loss, accuracy, samples/s], ...], oldest first (loss and accuracy may be None)."""
        with self._lock:
            return [list(p) for p in self._points]
