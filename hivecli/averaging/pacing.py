"""Pacing a peer's uplink without being told its rate (AveragingSettings.pacing = "auto").

Why: in a round of N peers, each one sends to the N - 1 others at once, a TCP flow each, out
through its one uplink. Unpaced, those flows overflow the queue in front of a slow link (a home
uplink, a shaped one): packets drop, the flows that lost them fall behind, and the round waits
for them at its end. 4 peers on 100 Mbit/s links moved 0.83-0.87 of the link's rate unpaced,
and 0.90-0.93 with every connection paced to its share of the link, anywhere from the link's
rate to 10% above it (docs/benchmarks.md). Few users know their uplink's rate
(`uplink_mbps`), so a peer learns it from its rounds:

- while a round runs, `RoundSampler` reads the TCP counters of the round's connections
  (ByteStream.send_stats: bytes acknowledged, retransmitted, not sent yet) every SAMPLE_S, and
  measures the rate at which the others acknowledged our bytes, all connections together, over
  the last WINDOW_S at each sample, where every connection had bytes waiting to be sent
  throughout: then the network set the pace, and where our flows keep a queue standing at the
  bottleneck, that rate is the bottleneck's (bytes of payload). Windows in which we had nothing
  to send (the round's start and end, the wait for a slower peer) say how fast we wrote, and
  are left out. The round's `peak` is the PEAK_QUANTILE of those rates: below the few windows
  that acknowledgements held up in a queue on the way back and then let go at once overstate;
- `UplinkEstimate` paces only once a round lost more than LOSS_FRACTION of its bytes (the queue
  overflowed, which pacing prevents), for as long as one of the last LOSS_MEMORY rounds did:
  loopback and links with room to spare lose nothing, and are never paced. Its `capacity` is
  the peak of the last round that the network, not our pace, held back, and it paces all of a
  round's connections together to a little less (PACE_GAIN), except in one round of about
  PROBE_EVERY, which may send a little more (PROBE_GAIN) and measures the link again: a link
  that got faster shows itself there, one that got slower in any round. The group's id decides
  which rounds probe (`probes`), so that every member probes in the same ones: a probe
  overflows the downlinks it sends to a little, and a round waits for its slowest member, so
  members that probed in rounds of their own disturbed one round in PROBE_EVERY each, most
  rounds together in a group of 4. A round that our sends held up (`RoundSampler.lagging`:
  every one of our connections was still sending well after the others' parts had all arrived)
  makes the next one probe: a first measurement that came out low (4 peers under cubic: 81
  Mbit/s where the others measured 92-94) would otherwise hold every round up until the
  group's probes raised it, PROBE_GAIN at a time. Only windows where the
  network set the pace count, so that a round slowed by something else (a slower peer, whose
  own pace may be what slowed it) cannot pull the estimate down, round after round.

Measured on 100 Mbit/s links (4 peers): the peaks of unpaced rounds were 93-96 Mbit/s of
payload, of paced ones 95-96; rounds then paced to 92-94 Mbit/s, each connection to a third of
it. With 4 peers, the queues that overflow are often the downlinks', where three senders meet:
paced to a third of its uplink each, no sender's flows can together overrun a downlink as fast
as its uplink. Rounds shorter than WINDOW_S plus MIN_WINDOWS samples (1.5 s: fast links, small
models) teach nothing. A TCP proxy on the way (netlab's `set_delay`, a SOCKS proxy)
acknowledges bytes before they cross the link, and only its queue's limit makes our sends wait
for the link: measured behind one, pacing was slower than TCP alone. netlab's `set_latency`
keeps TCP end to end, and there it was faster (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from hivecli.averaging.settings import PACING_SHARE
from hivecli.net.connection import Connection
from hivecli.net.transport import SendStats

logger = logging.getLogger(__name__)

SAMPLE_S = 0.1
WINDOW_S = 0.5
PEAK_QUANTILE = 0.8  # of a round's windows: above its start and end, below acknowledgements bunched by a queue
MIN_WINDOWS = 10  # a round shorter than WINDOW_S + MIN_WINDOWS samples (1.5 s) teaches nothing
LOSS_FRACTION = 0.001  # of the bytes a round's connections had acknowledged
MIN_LOSS_BYTES = 1 << 20  # a round that moved less says nothing about loss
LOSS_MEMORY = 50  # rounds
# A paced round sends at PACE_GAIN times the capacity measured (payload bytes; the pace also
# counts TCP headers, about 2% more): a little below the link, which leaves its queue room for
# our acknowledgements and for bursts. 4 peers on 100 Mbit/s links (capacity about 96 Mbit/s of
# payload) averaged at 0.93 of the link paced to 94 Mbit/s, 0.90 at 104, 0.85 at 113 or unpaced.
# One paced round in about PROBE_EVERY sends at up to PROBE_GAIN times it, to measure the link
# again: in 4-peer groups (100 Mbit/s links) a probe round took 5.4-5.9 s against 5.13-5.17 for
# the others (0 ms, float32), and never probing kept an estimate too low for good (one peer paced
# to 86 Mbit/s where the others measured 93-97: 0.82 of the link rate).
# A paced round whose peak fell below SLOWER times its pace measured a link slower than it was.
PACE_GAIN = 0.98
PROBE_GAIN = 1.1
PROBE_EVERY = 8
# A leader draws its group's id, so one that keeps drawing ids that never probe could keep a
# member's too-low estimate for good: a member probes anyway after this many paced rounds without.
MAX_ROUNDS_WITHOUT_PROBE = 4 * PROBE_EVERY
SLOWER = 0.9
# A round whose every connection was still sending LAG_S, and LAG_SHARE of the round, after the
# last part of our span arrived was held up by our pace (RoundSampler.lagging): the next round
# probes. A probe that finds less than LAG_FOUND more (ours, or the group's) keeps rounds that lag
# from probing for LAG_BACKOFF rounds: an uplink slower than the others' for real, or a link
# measured just now.
# 4 peers on 100 Mbit/s links, 50 ms: a peer whose unpaced first round measured 81 Mbit/s where
# the others measured 92-94 kept it, and every round waited for it (0.76 of the link rate).
LAG_S = 0.15
LAG_SHARE = 0.05
LAG_FOUND = 1.03
LAG_BACKOFF = 2 * PROBE_EVERY


class RoundSampler:
    """The TCP counters of one round's connections, as they move while the round runs.

    `add` each connection the round sends on; `run` samples them until cancelled (or call
    `sample` yourself). Then `rates` are the rates (bytes/s) at which the connections together
    had bytes acknowledged over the WINDOW_S before each sample, for the windows in which every
    connection had bytes waiting to be sent at every sample (the others say how fast we wrote,
    not how fast the network took it), `peak` their PEAK_QUANTILE, `acked` and `retransmitted`
    the bytes acknowledged and retransmitted on them since each was added, and `lagging` whether
    our sends held the round up."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first: dict[Connection, SendStats] = {}  # at first sight: what was not this round's
        self._last: dict[Connection, SendStats] = {}  # a connection that closed keeps its last counts
        # (time, acked, every connection had bytes waiting): the last WINDOW_S, and one sample more
        self._history: deque[tuple[float, int, bool]] = deque()
        self.rates: list[float] = []  # over the last WINDOW_S, at every sample after the first WINDOW_S
        self.acked = 0
        self.retransmitted = 0
        self._last_busy: dict[Connection, float] = {}  # the last sample at which it had bytes waiting
        self._first_sample: float | None = None  # when; the last one is the history's last
        self.inputs_done: float | None = None  # when the last part of our span arrived (`inputs_arrived`)

    def add(self, connection: Connection) -> None:
        """Count `connection` from now on; a connection without counters is left out."""
        if connection in self._first:
            return
        stats = connection.send_stats()
        if stats is not None:
            self._first[connection] = self._last[connection] = stats

    def sample(self) -> None:
        """Read every connection's counters now."""
        now = self._clock()
        acked = retransmitted = waiting = 0
        for connection, first in self._first.items():
            stats = connection.send_stats() or self._last[connection]
            self._last[connection] = stats
            if stats.unsent > 0:
                self._last_busy[connection] = now
                waiting += 1
            acked += stats.acked - first.acked
            retransmitted += stats.retransmitted - first.retransmitted
        self.acked, self.retransmitted = acked, retransmitted
        if self._first_sample is None:
            self._first_sample = now
        backlogged = 0 < waiting == len(self._first)
        self._history.append((now, acked, backlogged))
        while len(self._history) > 2 and self._history[1][0] <= now - WINDOW_S:
            self._history.popleft()  # keep the last sample at least WINDOW_S old
        then, acked_then, _ = self._history[0]
        if now - then >= WINDOW_S and all(busy for _, _, busy in self._history):
            self.rates.append((acked - acked_then) / (now - then))

    @property
    def peak(self) -> float | None:
        """The PEAK_QUANTILE of the rates over WINDOW_S (bytes/s), or None if the round had fewer
        than MIN_WINDOWS of them."""
        if len(self.rates) < MIN_WINDOWS:
            return None
        rates = sorted(self.rates)
        return rates[int(PEAK_QUANTILE * (len(rates) - 1))]

    def inputs_arrived(self) -> None:
        """The round's last part of our span arrived (the reducer's side): what is left to do is
        ours to send. Only the first call counts."""
        if self.inputs_done is None:
            self.inputs_done = self._clock()

    @property
    def lagging(self) -> bool:
        """Whether our sends held the round up: even the connection that was first to be done
        sending (the last sample at which it still had bytes waiting; acknowledgements, a round
        trip later, are not waited for) was still sending more than LAG_S, and more than
        LAG_SHARE of the round, after the last part of our span had arrived. The others' parts
        do not wait for ours (what they send back does), so every one of our connections was
        still sending long after the others had sent theirs: our pace (our estimate of the
        uplink) was below theirs. One connection that fell behind alone (a TCP stall, a slow
        downlink at its other end) is not counted, nor one that never had bytes waiting."""
        if self.inputs_done is None or self._first_sample is None or len(self._history) < 2 or not self._last_busy:
            return False
        sent = min(self._last_busy.values())
        return sent - self.inputs_done > max(LAG_S, LAG_SHARE * (self._history[-1][0] - self._first_sample))

    async def run(self) -> None:
        """Sample every SAMPLE_S until cancelled."""
        self.sample()
        while True:
            await asyncio.sleep(SAMPLE_S)
            self.sample()


class UplinkEstimate:
    """What a peer's rounds say about its uplink: whether to pace it, and to what rate.

    `capacity` (bytes of payload per second) is the peak of the last round that the network,
    not our pace, held back: an unpaced round, a probing one, or one whose peak fell well
    below its pace (the link got slower). Once a round lost bytes, rounds are paced to
    PACE_GAIN times it, and the rounds that probe (`probes`) to PROBE_GAIN times it: such a
    round measures the link again, and finds it if it got faster."""

    def __init__(self) -> None:
        self.capacity: float | None = None
        self._since_loss: int | None = None  # rounds since the last that lost bytes; None: none did
        self._since_probe = 0  # paced rounds since the last that probed
        self._probe_for_lag = False  # the next round probes: the last one waited for our sends
        self._lag_backoff = 0  # rounds before a round that lags may make the next one probe again

    @property
    def pacing(self) -> bool:
        return self._since_loss is not None and self.capacity is not None

    @property
    def rate(self) -> float | None:
        """What a round that does not probe paces all its connections to together (bytes/s);
        None: no pacing (no recent round lost bytes, or none measured the link yet)."""
        return self.capacity * PACE_GAIN if self.pacing and self.capacity is not None else None

    def next_round(self, probe: bool) -> tuple[float | None, bool]:
        """The next round's pace (bytes/s, None: unpaced) and whether it probes the link: if it
        is paced and `probe` (`probes` of its group), or MAX_ROUNDS_WITHOUT_PROBE paced rounds
        went by without a probe."""
        if not self.pacing or self.capacity is None:
            return None, False
        self._since_probe += 1
        probe = probe or self._probe_for_lag or self._since_probe > MAX_ROUNDS_WITHOUT_PROBE
        if probe:
            self._since_probe = 0
        return self.capacity * (PROBE_GAIN if probe else PACE_GAIN), probe

    def observe(
        self,
        peak: float | None,
        acked: int,
        retransmitted: int,
        pace: float | None,
        probing: bool,
        lagging: bool = False,
    ) -> None:
        """Learn from a round that RoundSampler measured, paced to `pace` (None: unpaced), in
        which our sends held the others up or not (`lagging`)."""
        before = self.capacity
        if peak is not None and (pace is None or probing or peak < SLOWER * pace):
            self.capacity = peak
        self._lag_backoff = max(0, self._lag_backoff - 1)
        if probing and (peak is None or before is None or peak < LAG_FOUND * before):
            self._lag_backoff = LAG_BACKOFF  # a probe (ours or the group's) found no more: the link is what we pace to
        self._probe_for_lag = lagging and pace is not None and not self._lag_backoff
        if acked >= MIN_LOSS_BYTES and retransmitted > LOSS_FRACTION * acked:
            self._since_loss = 0
        elif self._since_loss is not None:
            self._since_loss += 1
            if self._since_loss > LOSS_MEMORY:
                self._since_loss = None


def probes(group_id: bytes) -> bool:
    """Whether a round of the group `group_id` probes the link (about one in PROBE_EVERY: the
    leader draws the id at random). Every member of the group gets the same answer."""
    return int.from_bytes(group_id[:4], "big") % PROBE_EVERY == 0


class Pacer:
    """A peer's pacing, round by round: its share of `uplink_mbps` where the user gave it,
    else (pacing = "auto") what its rounds taught an UplinkEstimate; says when that changes."""

    def __init__(self, uplink_mbps: float | None, mode: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # its samplers' (a test's own clock drives them)
        self._fixed = uplink_mbps * 1e6 / 8 * PACING_SHARE if uplink_mbps else None
        self._auto = uplink_mbps is None and mode == "auto"
        self.estimate = UplinkEstimate()
        self._pacing = False  # whether "auto" paced our last round (logged when it changes)
        self._round: tuple[float | None, bool] = (None, False)  # the pace of the round under way, and if it probes

    @property
    def rate(self) -> float | None:
        """The bytes per second all of a round's connections together may send; None: unpaced."""
        return self._fixed if self._fixed is not None else self.estimate.rate if self._auto else None

    def start_round(self, group_id: bytes) -> tuple[float | None, RoundSampler | None]:
        """The pace of a round of the group `group_id` (bytes/s for all its connections
        together; None: unpaced), and a sampler for the round's connections where "auto" learns."""
        if not self._auto:
            return self._fixed, None
        self._round = self.estimate.next_round(probes(group_id))
        if self.estimate.pacing != self._pacing:
            self._pacing = self.estimate.pacing
            if self.estimate.capacity is not None and self._pacing:
                logger.info(
                    "Averaging rounds now pace this peer's uplink to about %.1f Mbit/s, the rate a round measured: "
                    "a round lost packets unpaced, as its connections overflowed a queue on the way (pacing = "
                    "'auto'; set uplink_mbps if you know the rate)",
                    self.estimate.capacity * PACE_GAIN * 8 / 1e6,
                )
            else:
                logger.info("Averaging rounds no longer pace this peer's uplink: no recent round lost packets")
        return self._round[0], RoundSampler(self._clock)

    def end_round(self, sampler: RoundSampler | None) -> None:
        """Learn from the round `start_round` gave `sampler` to."""
        if sampler is not None:
            pace, probing = self._round
            self.estimate.observe(sampler.peak, sampler.acked, sampler.retransmitted, pace, probing, sampler.lagging)
