"""benchmarks/_linkuse.py: how bench_wan.py --trace splits a round by a peer's link use."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _linkuse

RATE = 100e6  # bits per second


def _samples(phases: list[tuple[float, float]], t0: float = 1000.0, step: float = 0.01) -> list[tuple[float, int]]:
    """Byte-counter samples every `step` s for phases of (seconds, share of RATE)."""
    samples, t, sent = [(t0, 0)], t0, 0.0
    for seconds, share in phases:
        for _ in range(round(seconds / step)):
            t += step
            sent += share * RATE / 8 * step
            samples.append((t, int(sent)))
    return samples


def test_a_round_splits_into_its_idle_start_its_busy_middle_and_its_idle_tail() -> None:
    samples = _samples([(0.1, 0.0), (0.2, 0.0), (2.0, 0.9), (0.3, 0.05), (0.2, 0.0)])
    split = _linkuse.split_round(samples, 1000.1, 1002.7, RATE)
    assert abs(split["start"] - 0.2) < 0.02
    assert abs(split["middle"] - 2.0) < 0.02
    assert abs(split["use"] - 0.9) < 0.02
    assert abs(split["tail"] - 0.4) < 0.02  # a trickle below half the rate is not busy


def test_a_round_the_samples_do_not_cover_gives_zeros_and_an_idle_one_is_all_start() -> None:
    samples = _samples([(1.0, 0.0)])
    assert _linkuse.split_round(samples, 999.0, 1000.5, RATE)["middle"] == 0.0
    idle = _linkuse.split_round(samples, 1000.1, 1000.9, RATE)
    assert abs(idle["start"] - 0.8) < 1e-9 and idle["use"] == 0.0
