"""pacing.py: what a round's TCP counters say about the uplink, and when and how fast to pace."""

from __future__ import annotations

import logging
import random

import pytest

from hivecli.averaging import pacing
from hivecli.averaging.pacing import Pacer, RoundSampler, UplinkEstimate
from hivecli.averaging.settings import PACING_SHARE
from hivecli.net.transport import SendStats

GROUP = bytes([0, 0, 0, 1]) + bytes(16)  # a round that does not probe (pacing.probes)
PROBING_GROUP = bytes(20)  # one that does


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeConnection:
    """Counters that move as a test says: bytes acknowledged and retransmitted so far."""

    def __init__(self, acked: int = 0, retransmitted: int = 0) -> None:
        self.stats: SendStats | None = SendStats(acked, retransmitted, 1)

    def send(self, acked: int, retransmitted: int = 0, unsent: int = 65536) -> None:
        """`acked` more bytes acknowledged; `unsent` bytes still waiting (0: it sent all it had)."""
        assert self.stats is not None
        self.stats = SendStats(self.stats.acked + acked, self.stats.retransmitted + retransmitted, unsent)

    def send_stats(self) -> SendStats | None:
        return self.stats


def run_round(
    sampler: RoundSampler,
    clock: Clock,
    connections: list[FakeConnection],
    rates: list[float],
    seconds: float,
    unsent: int = 65536,
) -> None:
    """Each connection sends at its rate (bytes/s) for `seconds`, with `unsent` bytes still
    waiting at each sample, sampled every SAMPLE_S."""
    steps = round(seconds / pacing.SAMPLE_S)
    for _ in range(steps):
        clock.now += pacing.SAMPLE_S
        for connection, rate in zip(connections, rates, strict=True):
            connection.send(int(rate * pacing.SAMPLE_S), unsent=unsent)
        sampler.sample()


def test_a_round_measures_the_rate_its_connections_had_bytes_acknowledged_at_together():
    clock = Clock()
    sampler = RoundSampler(clock)
    old = FakeConnection(acked=10**9, retransmitted=10**6)  # what it carried before the round is not counted
    steady = FakeConnection()
    for connection in (old, steady):
        sampler.add(connection)  # type: ignore[arg-type]
    sampler.sample()
    run_round(sampler, clock, [old, steady], [3e6, 5e6], 2.0)
    assert sampler.peak == pytest.approx(8e6)
    assert sampler.acked == pytest.approx(16e6, rel=1e-6)
    assert sampler.retransmitted == 0
    old.send(0, retransmitted=4096)
    sampler.sample()
    old.stats = None  # closed: its last counts stay
    clock.now += pacing.SAMPLE_S
    sampler.sample()
    assert sampler.retransmitted == 4096 and sampler.acked == pytest.approx(16e6, rel=1e-6)


def test_bunched_acknowledgements_and_the_rounds_ends_do_not_make_the_peak_and_a_short_round_has_none():
    clock = Clock()
    sampler = RoundSampler(clock)
    connection = FakeConnection()
    sampler.add(connection)  # type: ignore[arg-type]
    sampler.sample()
    run_round(sampler, clock, [connection], [0.5e6], pacing.WINDOW_S + (pacing.MIN_WINDOWS - 2) * pacing.SAMPLE_S)
    assert sampler.peak is None  # fewer than MIN_WINDOWS windows: a round that short teaches nothing
    run_round(sampler, clock, [connection], [1e6], 2.0)
    connection.send(100_000)  # a 100 ms queue's worth of acknowledgements, held up and then let go at once
    run_round(sampler, clock, [connection], [1e6], 2.0)
    run_round(sampler, clock, [connection], [0.1e6], 0.5)  # the last flows finish: the tail
    assert sampler.peak == pytest.approx(1e6)  # a quantile of the windows, neither the ramp, the tail nor the burst


def test_only_windows_where_every_connection_had_bytes_waiting_measure_the_network():
    clock = Clock()
    sampler = RoundSampler(clock)
    busy, idle = FakeConnection(), FakeConnection()
    for connection in (busy, idle):
        sampler.add(connection)  # type: ignore[arg-type]
    sampler.sample()
    run_round(sampler, clock, [busy, idle], [4e6, 4e6], 2.0)
    run_round(sampler, clock, [busy, idle], [3e6, 3e6], 0.3, unsent=0)  # written as fast as we had them: not measured
    run_round(sampler, clock, [busy, idle], [4e6, 4e6], 2.0)
    windows = len(sampler.rates)
    assert windows > 20 and sampler.rates == [pytest.approx(8e6)] * windows  # none spans the 0.3 s at 6 MB/s
    idle.send(0, unsent=0)  # one connection has nothing left to send: the others alone do not measure the link
    run_round(sampler, clock, [busy], [1e6], 2.0)
    assert sampler.peak == pytest.approx(8e6) and len(sampler.rates) == windows


def test_a_connection_added_mid_round_counts_from_then_and_one_without_counters_not_at_all():
    clock = Clock()
    sampler = RoundSampler(clock)
    first, late, blind = FakeConnection(), FakeConnection(acked=5_000_000), FakeConnection()
    blind.stats = None
    sampler.add(first)  # type: ignore[arg-type]
    sampler.add(blind)  # type: ignore[arg-type]
    run_round(sampler, clock, [first], [2e6], 1.0)
    late.send(7_000_000)
    sampler.add(late)  # type: ignore[arg-type]
    sampler.add(late)  # type: ignore[arg-type]  # twice: still counted from its first sight
    run_round(sampler, clock, [first, late], [2e6, 2e6], 1.0)
    assert sampler.acked == pytest.approx(6e6, rel=1e-6)


def test_rounds_are_paced_only_after_one_lost_bytes_a_little_below_the_link_and_probe_it_when_told():
    estimate = UplinkEstimate()
    estimate.observe(10e6, acked=50_000_000, retransmitted=0, pace=None, probing=False)
    assert estimate.rate is None and estimate.next_round(probe=True) == (None, False)  # nothing lost: TCP alone
    estimate.observe(11e6, acked=50_000_000, retransmitted=500_000, pace=None, probing=False)  # 1% lost
    assert estimate.capacity == 11e6 and estimate.rate == pytest.approx(11e6 * pacing.PACE_GAIN)
    assert estimate.next_round(probe=False) == (pytest.approx(11e6 * pacing.PACE_GAIN), False)
    assert estimate.next_round(probe=True) == (pytest.approx(11e6 * pacing.PROBE_GAIN), True)


def test_every_member_of_a_group_probes_in_the_same_rounds_about_one_in_probe_every():
    rng = random.Random(7)
    group_ids = [rng.randbytes(20) for _ in range(8000)]  # as leaders draw them (os.urandom)
    share = sum(map(pacing.probes, group_ids)) / len(group_ids)
    assert share == pytest.approx(1 / pacing.PROBE_EVERY, rel=0.15)
    members = [Pacer(None, "auto") for _ in range(4)]
    for i, member in enumerate(members):  # each learned a slightly different link, and paces it
        member.estimate.observe(10e6 + i, acked=50_000_000, retransmitted=500_000, pace=None, probing=False)
        for _ in range(i):  # and joined the swarm at a different time: a different number of paced rounds
            member.start_round(GROUP)
    for group_id in group_ids[:200]:
        rates = [member.start_round(group_id)[0] for member in members]
        gain = pacing.PROBE_GAIN if pacing.probes(group_id) else pacing.PACE_GAIN
        assert rates == [pytest.approx((10e6 + i) * gain) for i in range(len(members))]


def test_a_leader_that_never_lets_a_round_probe_cannot_keep_an_estimate_low_for_good():
    estimate = UplinkEstimate()
    estimate.observe(10e6, acked=50_000_000, retransmitted=500_000, pace=None, probing=False)
    rounds = [estimate.next_round(probe=False)[1] for _ in range(3 * pacing.MAX_ROUNDS_WITHOUT_PROBE + 3)]
    assert rounds == 3 * ([False] * pacing.MAX_ROUNDS_WITHOUT_PROBE + [True])


def test_only_rounds_the_network_held_back_measure_the_link():
    estimate = UplinkEstimate()
    estimate.observe(10e6, acked=50_000_000, retransmitted=500_000, pace=None, probing=False)
    pace = 10e6 * pacing.PACE_GAIN
    estimate.observe(pace / 1.02, acked=50_000_000, retransmitted=0, pace=pace, probing=False)
    assert estimate.capacity == 10e6  # it sent at its pace (its headers aside): that says nothing of the link
    estimate.observe(12e6, acked=50_000_000, retransmitted=0, pace=11e6, probing=True)
    assert estimate.capacity == 12e6  # a probe: the link got faster
    estimate.observe(9.5e6, acked=50_000_000, retransmitted=0, pace=11e6, probing=True)
    assert estimate.capacity == 9.5e6  # or slower
    estimate.observe(6e6, acked=50_000_000, retransmitted=0, pace=9.3e6, probing=False)
    assert estimate.capacity == 6e6  # well below its pace, with bytes waiting: the link got slower
    estimate.observe(None, acked=100_000, retransmitted=0, pace=5.9e6, probing=True)
    assert estimate.capacity == 6e6  # a round too short to measure forgets nothing


def test_rounds_are_unpaced_again_once_none_lost_bytes_for_a_while():
    estimate = UplinkEstimate()
    estimate.observe(10e6, acked=50_000_000, retransmitted=500_000, pace=None, probing=False)
    for _ in range(pacing.LOSS_MEMORY):
        estimate.observe(None, acked=50_000_000, retransmitted=0, pace=estimate.rate, probing=False)
    assert estimate.rate is not None  # LOSS_MEMORY rounds since the loss
    estimate.observe(None, acked=50_000_000, retransmitted=0, pace=estimate.rate, probing=False)
    assert estimate.rate is None and estimate.next_round(probe=False) == (None, False)


def test_a_small_round_or_a_trickle_of_retransmissions_is_not_a_loss():
    estimate = UplinkEstimate()
    estimate.observe(1e6, acked=100_000, retransmitted=50_000, pace=None, probing=False)  # too few bytes to judge
    estimate.observe(1e6, acked=100_000_000, retransmitted=50_000, pace=None, probing=False)  # 0.05%
    assert estimate.rate is None


def test_a_pacer_uses_the_users_uplink_else_learns_it_unless_off(caplog: pytest.LogCaptureFixture):
    fixed = Pacer(80.0, "auto")
    assert fixed.start_round(PROBING_GROUP) == (pytest.approx(10e6 * PACING_SHARE), None)
    assert Pacer(None, "off").start_round(PROBING_GROUP) == (None, None)
    auto = Pacer(None, "auto")
    rate, sampler = auto.start_round(PROBING_GROUP)
    assert rate is None and isinstance(sampler, RoundSampler)
    sampler.rates = [12.5e6] * 10
    sampler.acked, sampler.retransmitted = 40_000_000, 400_000
    auto.end_round(sampler)
    with caplog.at_level(logging.INFO, logger="hivecli.averaging.pacing"):
        for _ in range(2):
            rate, _ = auto.start_round(GROUP)
            assert rate == pytest.approx(12.5e6 * pacing.PACE_GAIN)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "pace this peer's uplink to about 98.0 Mbit/s" in said[0]


def lag_round(sent_s: list[float], inputs_s: float | None, seconds: float = 3.0) -> RoundSampler:
    """A round in which each connection is done sending after its `sent_s` seconds (at a steady
    rate until then) and the last part of our span arrives after `inputs_s` (None: never)."""
    clock = Clock()
    sampler = RoundSampler(clock)
    connections = [FakeConnection() for _ in sent_s]
    for connection in connections:
        sampler.add(connection)  # type: ignore[arg-type]
    sampler.sample()
    for step in range(1, round(seconds / pacing.SAMPLE_S) + 1):
        clock.now += pacing.SAMPLE_S
        t = step * pacing.SAMPLE_S
        for connection, done in zip(connections, sent_s, strict=True):
            sending = t <= done + 1e-9
            connection.send(1_000_000 if sending else 0, unsent=65536 if sending else 0)
        sampler.sample()
        if inputs_s is not None and t >= inputs_s - 1e-9:
            sampler.inputs_arrived()
    return sampler


def test_a_round_lags_when_every_connection_still_sends_long_after_the_others_parts_arrived():
    assert lag_round([2.9, 2.9, 2.9], inputs_s=2.5).lagging  # our pace held the round up
    assert not lag_round([2.6, 2.6, 2.6], inputs_s=2.5).lagging  # our averages follow the last parts
    assert not lag_round([2.9, 2.9, 2.9], inputs_s=2.85).lagging  # a slow sender's part held us up
    assert not lag_round([2.5, 2.9, 2.5], inputs_s=2.5).lagging  # one connection fell behind alone
    assert not lag_round([2.9, 2.9, 2.9], inputs_s=None).lagging  # no span of ours (or a failed round)


def test_a_round_that_lags_makes_the_next_probe_until_a_probe_finds_no_more():
    estimate = UplinkEstimate()
    estimate.observe(8e6, acked=50_000_000, retransmitted=500_000, pace=None, probing=False)  # measured low
    pace, probe = estimate.next_round(probe=False)
    assert not probe
    estimate.observe(None, acked=50_000_000, retransmitted=0, pace=pace, probing=False, lagging=True)
    pace, probe = estimate.next_round(probe=False)  # the round waited for us: measure again at once
    assert probe and pace == pytest.approx(8e6 * pacing.PROBE_GAIN)
    estimate.observe(8.8e6, acked=50_000_000, retransmitted=0, pace=pace, probing=True, lagging=True)
    assert estimate.capacity == 8.8e6
    pace, probe = estimate.next_round(probe=False)  # it found more and still lags: again
    assert probe
    estimate.observe(8.9e6, acked=50_000_000, retransmitted=0, pace=pace, probing=True, lagging=True)
    rounds = []
    for _ in range(pacing.LAG_BACKOFF + 1):  # found no more: our uplink is the slow one; lag or not
        pace, probe = estimate.next_round(probe=False)
        rounds.append(probe)
        estimate.observe(None, acked=50_000_000, retransmitted=500_000, pace=pace, probing=probe, lagging=True)
    assert rounds == [False] * pacing.LAG_BACKOFF + [True]
    unpaced = UplinkEstimate()  # a round that lost bytes and lagged, unpaced: our pace held nothing up
    unpaced.observe(8e6, acked=50_000_000, retransmitted=500_000, pace=None, probing=False, lagging=True)
    assert unpaced.next_round(probe=False) == (pytest.approx(8e6 * pacing.PACE_GAIN), False)


def test_a_group_probe_that_found_no_more_keeps_a_lagging_round_from_probing_again_at_once():
    estimate = UplinkEstimate()
    estimate.observe(8e6, acked=50_000_000, retransmitted=500_000, pace=None, probing=False)
    pace, probe = estimate.next_round(probe=True)  # the group's probe
    estimate.observe(8.1e6, acked=50_000_000, retransmitted=0, pace=pace, probing=probe, lagging=True)
    assert estimate.next_round(probe=False)[1] is False  # the link was measured just now


def test_a_pacer_hands_the_samplers_verdict_to_its_estimate():
    clock = Clock()
    pacer = Pacer(None, "auto", clock)
    pacer.estimate.observe(8e6, acked=50_000_000, retransmitted=500_000, pace=None, probing=False)
    for lagging in (False, True):
        _, sampler = pacer.start_round(GROUP)
        assert sampler is not None
        connection = FakeConnection()
        sampler.add(connection)
        sampler.sample()
        sampler.inputs_arrived()  # our span was complete at once
        clock.now += 1.0  # and our connection sent for another second (lagging), or had sent it all
        connection.send(1_000_000, unsent=65536 if lagging else 0)
        sampler.sample()
        clock.now += 0.1
        connection.send(65536, unsent=0)
        sampler.sample()
        assert sampler.lagging is lagging
        pacer.end_round(sampler)
    assert pacer.start_round(GROUP)[0] == pytest.approx(8e6 * pacing.PROBE_GAIN)  # the round that lagged: a probe
