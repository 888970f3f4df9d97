"""Timeouts and sizes of decentralized averaging, as one frozen value object."""

from __future__ import annotations

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
        request_timeout: seconds to wait for a reply to a join request (default 3); it must be
            shorter than min_matchmaking_time, so that a peer that does not answer costs less
            than the time the group waits anyway.
        allreduce_timeout: upper bound on one all-reduce, from group assembly to the last
            averaged part (default 300 s).
        next_chunk_timeout: a peer that sends nothing for this long in the middle of an
            all-reduce is dropped from the round (default 30 s).
        step_timeout: default for `step(timeout=None)`: give up looking for a group after this
            many seconds (default 60 s).
        chunk_bytes: bytes per message on the wire (default 8 MiB): large enough that per-message
            costs vanish, small enough to overlap receiving with reducing.
        declare_state_period: a state donor re-announces itself this often (default 30 s).
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
