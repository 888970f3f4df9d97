"""Timeouts, sizes and defences of decentralized averaging, as one frozen value object."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hivecli._exceptions import ConfigError


@dataclass(frozen=True)
class AveragingSettings:
    """How an averager finds groups and moves tensors.

    Attributes:
        target_group_size: assemble a group as soon as this many peers are in it (default 4).
        min_group_size: a smaller group is disbanded and the step keeps looking (default 2).
        min_matchmaking_time: how long a peer that leads an incomplete group waits for more
            peers before averaging with those it has (default 5 s). A full group never waits.
            In a swarm the size of a group, the last round's leader waits 10% less, which keeps
            it first, so that the others can ask it at once (matchmaking.HEAD_START).
        request_timeout: seconds to wait for a reply to a join request (default 3); it must be
            shorter than min_matchmaking_time, so that a peer that does not answer costs less
            than the time the group waits anyway.
        allreduce_timeout: upper bound on one all-reduce, from group assembly to the last
            averaged part (default 300 s). A member whose owner holds its scheduled round
            (and says so) is waited for up to half of it (allreduce.py).
        next_chunk_timeout: a peer that sends nothing for this long in the middle of an
            all-reduce is dropped from the round (default 30 s).
        step_timeout: default for `step(timeout=None)`: give up looking for a group after this
            many seconds (default 60 s).
        chunk_bytes: the largest message on the wire (default 8 MiB): large enough that
            per-message costs vanish, small enough to overlap receiving with reducing. A round's
            leader picks smaller chunks for a slow link, what it carries in 50 ms (link.py), so
            that control messages do not wait behind a chunk.
        declare_state_period: a state donor re-announces itself this often (default 30 s).
        max_weight_ratio: a reducer caps every member's weight at this many times the lower
            median of the group's positive weights (default 10), so that one peer claiming a
            huge weight cannot make the average its own tensors. A peer's weight is meant to
            be its sample count (or anything proportional to it, equal for all by default).
        aggregation: how a reducer combines the contributions to each chunk: "mean" (the
            weighted mean; default), "trimmed_mean" (per coordinate, the mean after dropping
            the `trim_fraction` highest and lowest values) or "centered_clip" (CenteredClip,
            Karimireddy et al. 2021, as in BTARD). The robust modes ignore weights, except that
            a zero weight still contributes nothing; every peer of a run should use the same.
        trim_fraction: share of the highest and of the lowest values "trimmed_mean" drops per
            coordinate, in [0, 0.5) (default 0.2); at least one each side once there are 3
            contributions or more.
        clip_iterations: iterations of CenteredClip (default 3).
        clip_tau: CenteredClip's clipping radius; 0 (default) adapts it per chunk to the median
            L2 distance of the contributions from their coordinate-wise median.
        ban_duration: seconds a peer caught sending non-finite values, returning non-finite
            averages or serving an invalid state is refused as a sender, reducer and state
            donor (default 600).
        verify_reducers: after receiving a reducer's averages, a sender audits them at
            `audit_positions` random positions of that span: the reducer must show the inputs
            it aggregated there, its claim for the sender's own input must be what the sender
            sent, and the inputs must give the average it returned. A reducer that fails is
            ignored (the sender keeps its local values for that span) and banned (default
            True). Not audited: a reducer whose published averages the sender reads in shared
            memory, a process of the sender's own user (sharedmem.py, "Trust"). Every peer of a
            run should use the same: a reducer with it off refuses audits.
        audit_positions: positions of a span each sender audits per round (default 8), between
            1 and 1024; every peer of a run must use the same, since a reducer refuses any other count.
        bulk_links: which transfers move their bytes on a TCP connection of their own, driven by
            blocking calls on worker threads (hivecli.net.bulk), where the other peer can be
            dialed directly: "auto" (default: state downloads, measured 1.5-2x faster, and
            all-reduce spans of 1 MiB or more where this peer has 4 cores or more (its share of
            the machine among the hive peers on it), our last rounds measured the link at 300
            MB/s or more, and nothing paces it (uplink_mbps, pacing): on 16 cores 1.5-1.9x faster at 50M
            floats, slower with one core per peer and on a 100 Mbit/s link;
            link.spans_take_bulk_links), "state" (state downloads only), "all" (state downloads
            and every all-reduce span of 1 MiB or more; each round pays a few milliseconds to
            set the links up) or "none".
        shared_memory: peers on one host move their chunks through buffers both map (files of
            our own user under /dev/shm, sharedmem.py) instead of loopback TCP: one copy per
            chunk instead of the kernel's two and its network stack (default True). Links sealed
            between processes of one host (`encrypt_same_host`) never use it; where /dev/shm is
            missing or full, the chunks take the stream.
        uplink_mbps: this peer's upload rate in Mbit/s, where known (default None: unknown).
            During a round, each connection to a member of the group then sends at most its
            share of PACING_SHARE of it (the kernel paces the socket), so that the bottleneck's
            queue, shared by one TCP flow per member, never overflows: on a shaped 100 Mbit/s
            link, 4 peers dropped 90-204 packets per round without it, and the flows that
            lost them fell behind; paced, none (0.85-0.86 of the link rate -> 0.91-0.93, and
            0.80-0.82 -> 0.86-0.90 with 50 ms RTT: docs/benchmarks.md). Set too high, it
            changes nothing; too low, it caps averaging.
            Bulk links are not paced ("auto" keeps all-reduce spans on the stream when this is set).
        pacing: where `uplink_mbps` is not set, "auto" (default) learns the uplink's rate from
            the rounds (pacing.py): once a round lost packets on the way (its connections
            retransmitted more than 0.1% of their bytes: a queue on the path overflowed), the
            following rounds pace every connection to its share of a little less than the rate
            the network acknowledged our bytes at. A link that loses nothing (loopback, one with
            room to spare) is never paced. "off": TCP alone. 4 peers on 100 Mbit/s links with
            the latency on the path (netlab.set_latency): 0.91-0.93 of the link (0.83-0.87
            unpaced), and with 50 ms RTT 0.87-0.90 in fp32 and 0.81-0.89 in fp16 (0.81-0.84
            and 0.77-0.84 unpaced); 2 peers the same within 0.04 either way
            (docs/benchmarks.md). A TCP proxy on the way misleads its
            measurements: it acknowledges our bytes before they cross the link.
    """

    target_group_size: int = 4
    min_group_size: int = 2
    min_matchmaking_time: float = 5.0
    request_timeout: float = 3.0
    allreduce_timeout: float = 300.0
    next_chunk_timeout: float = 30.0
    step_timeout: float = 60.0
    chunk_bytes: int = 8 * 1024 * 1024
    declare_state_period: float = 30.0
    max_weight_ratio: float = 10.0
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    clip_iterations: int = 3
    clip_tau: float = 0.0
    ban_duration: float = 600.0
    verify_reducers: bool = True
    audit_positions: int = 8
    bulk_links: str = "auto"
    shared_memory: bool = True
    uplink_mbps: float | None = None
    pacing: str = "auto"

    def __post_init__(self) -> None:
        if self.min_group_size < 1:
            raise ConfigError(f"min_group_size = {self.min_group_size}: must be >= 1")
        if self.target_group_size < max(2, self.min_group_size):
            raise ConfigError(
                f"target_group_size = {self.target_group_size}: must be >= 2 and >= min_group_size "
                f"({self.min_group_size})"
            )
        for name in ("min_matchmaking_time", "request_timeout", "allreduce_timeout", "next_chunk_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} = {getattr(self, name)}: must be a positive number of seconds")
        if self.request_timeout >= self.min_matchmaking_time:
            raise ConfigError(
                f"request_timeout = {self.request_timeout} must be less than min_matchmaking_time = "
                f"{self.min_matchmaking_time}; otherwise one silent peer stalls a whole group"
            )
        if self.chunk_bytes < 4096:
            raise ConfigError(f"chunk_bytes = {self.chunk_bytes}: must be at least 4096")
        if self.uplink_mbps is not None and not (
            isinstance(self.uplink_mbps, (int, float))
            and not isinstance(self.uplink_mbps, bool)
            and math.isfinite(self.uplink_mbps)
            and self.uplink_mbps > 0
        ):
            raise ConfigError(
                f"uplink_mbps = {self.uplink_mbps!r} must be a positive number of Mbit/s (this peer's upload "
                "rate), or None where it is not known"
            )
        if self.pacing not in PACINGS:
            raise ConfigError(f"pacing = {self.pacing!r} must be one of {', '.join(map(repr, PACINGS))}")
        self._check_defences()

    def _check_defences(self) -> None:
        """Raises ConfigError naming the first robustness setting out of range."""
        if not (isinstance(self.max_weight_ratio, (int, float)) and math.isfinite(self.max_weight_ratio)) or (
            self.max_weight_ratio < 1
        ):
            raise ConfigError(
                f"max_weight_ratio = {self.max_weight_ratio!r} must be a finite number >= 1; it bounds how many "
                "times the group's median weight one peer may count for"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation = {self.aggregation!r} is not known; use one of: {', '.join(AGGREGATIONS)}")
        if not (isinstance(self.trim_fraction, (int, float)) and 0 <= self.trim_fraction < 0.5):
            raise ConfigError(
                f"trim_fraction = {self.trim_fraction!r} must be a number in [0, 0.5): the share of the highest "
                "and of the lowest values that trimmed_mean drops"
            )
        if (
            not isinstance(self.clip_iterations, int)
            or isinstance(self.clip_iterations, bool)
            or not (1 <= self.clip_iterations <= 100)
        ):
            raise ConfigError(f"clip_iterations = {self.clip_iterations!r} must be an integer between 1 and 100")
        if not (isinstance(self.clip_tau, (int, float)) and math.isfinite(self.clip_tau) and self.clip_tau >= 0):
            raise ConfigError(
                f"clip_tau = {self.clip_tau!r} must be a finite number >= 0 (0 adapts it to the contributions)"
            )
        if not (isinstance(self.ban_duration, (int, float)) and math.isfinite(self.ban_duration)) or (
            self.ban_duration < 0
        ):
            raise ConfigError(f"ban_duration = {self.ban_duration!r} must be a finite number of seconds >= 0")
        for name in ("verify_reducers", "shared_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} = {getattr(self, name)!r} must be True or False")
        if self.bulk_links not in BULK_LINKS:
            raise ConfigError(f"bulk_links = {self.bulk_links!r} must be one of {', '.join(map(repr, BULK_LINKS))}")
        if (
            not isinstance(self.audit_positions, int)
            or isinstance(self.audit_positions, bool)
            or not (1 <= self.audit_positions <= MAX_AUDIT_POSITIONS)
        ):
            raise ConfigError(
                f"audit_positions = {self.audit_positions!r} must be an integer between 1 and {MAX_AUDIT_POSITIONS}"
            )


AGGREGATIONS = ("mean", "trimmed_mean", "centered_clip")
# The share of `uplink_mbps` a round's connections may use together: what is left carries the
# TCP/IP headers the pacing does not count (about 2%) and our acknowledgements of what the group
# sends us (about 2% on a symmetric link; more where the downlink is much faster). 0.94 dropped
# no packet on a 100 Mbit/s tbf link with 2 and 4 peers.
PACING_SHARE = 0.94
BULK_LINKS = ("auto", "state", "all", "none")
PACINGS = ("auto", "off")
MAX_AUDIT_POSITIONS = 1024  # an audit reply (positions x members x 2 numbers) stays well under a 4 MiB header
