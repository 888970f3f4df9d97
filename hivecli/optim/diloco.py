"""`DiLoCoOptimizer`: DiLoCo (Douillard et al. 2023; OpenDiLoCo 2024) over hive's averager.

Each peer takes `local_steps` steps with its inner optimizer (AdamW in the paper), then the
*outer step*: the pseudo-gradient, the shared (outer) parameters minus the current ones, is
averaged with whichever peers are in the group, weighted by the samples each contributed; the
outer optimizer (SGD, Nesterov momentum 0.9, lr 0.7 in the paper) applies it to the outer
parameters, and the model is reset to them. Peers communicate once per `local_steps` steps,
hundreds of times less than synchronous training, and match it at H = 500.

The outer parameters are float32 CPU copies; the outer optimizer's state (its momentum) is
part of what a newcomer downloads, with the outer step counter (`local_epoch`). The group for
an outer step is looked for while the last inner steps run, keyed by the outer step, so that
only peers about to take the same outer step meet. A peer that finds nobody applies its own
pseudo-gradient and says so.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from hivecli._exceptions import ConfigError, HiveError, MatchmakingError
from hivecli.averaging.averager import DecentralizedAverager, StepControl
from hivecli.dht.dht import DHT
from hivecli.optim.state import TrainingState, load_training_state
from hivecli.optim.tracker import ProgressTracker
from hivecli.optim.wrapper import (
    WrappedOptimizer,
    averager_options,
    build_optimizer,
    check_seconds,
    finish_round,
)

logger = logging.getLogger(__name__)


class DiLoCoOptimizer(WrappedOptimizer):
    """Local steps with `inner_optimizer`, an averaged outer step every `local_steps` steps.

    Args:
        dht: a running `hivecli.DHT`.
        run_id: the run's name; peers with the same run_id and model train together.
        params: the model's parameters.
        inner_optimizer: a callable that builds the inner optimizer from `params` (e.g.
            `lambda p: torch.optim.AdamW(p, lr=4e-4)`), or a torch optimizer over them.
        outer_optimizer: a callable that builds the outer optimizer from the outer parameters,
            e.g. `lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)`.
        local_steps: inner steps between outer steps (H; 500 in the paper).
        batch_size_per_step: samples per step, the weight of a peer's pseudo-gradient (default:
            its number of inner steps).
        compression: codec of the pseudo-gradients ("fp16" loses nothing measurable).
        matchmaking_time: seconds to gather a group before an outer step.
        averaging_timeout: seconds an averaging round may take before it is given up.
        load_state_timeout: seconds to download the state from peers.
        extra_tensors: tensors shared with newcomers but not averaged (a model's buffers).
        client_mode: never accept connections (default: the DHT's mode).
        averager_opts: more `DecentralizedAverager` settings (target_group_size, ...).
        verbose: log each outer step at INFO level.

    Raises:
        ConfigError: an argument is out of range or the wrong kind (the message names it).
    """

    def __init__(
        self,
        *,
        dht: DHT,
        run_id: str,
        params: Iterable[torch.Tensor],
        inner_optimizer: torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer],
        outer_optimizer: Callable[[Any], torch.optim.Optimizer],
        local_steps: int = 500,
        batch_size_per_step: int | None = None,
        compression: Any = None,
        matchmaking_time: float = 5.0,
        averaging_timeout: float = 60.0,
        load_state_timeout: float = 600.0,
        extra_tensors: Sequence[torch.Tensor] = (),
        client_mode: bool | None = None,
        averager_opts: dict[str, Any] | None = None,
        verbose: bool = False,
    ):
        for name, value in (("local_steps", local_steps), ("batch_size_per_step", batch_size_per_step or 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} = {value!r}: must be an integer >= 1")
        check_seconds(
            matchmaking_time=matchmaking_time,
            averaging_timeout=averaging_timeout,
            load_state_timeout=load_state_timeout,
        )
        self.params = [p for p in params]
        if not self.params or any(isinstance(p, dict) for p in self.params):
            raise ConfigError("params must be the model's parameters, e.g. params=model.parameters()")
        if isinstance(inner_optimizer, torch.optim.Optimizer):
            inner = build_optimizer(inner_optimizer, None, "inner_optimizer")
            owned = {id(p) for group in inner.param_groups for p in group["params"]}
            if owned != {id(p) for p in self.params}:
                raise ConfigError("inner_optimizer must optimize exactly `params`")
        else:
            inner = build_optimizer(inner_optimizer, self.params, "inner_optimizer")
        if isinstance(outer_optimizer, torch.optim.Optimizer) or not callable(outer_optimizer):
            raise ConfigError(
                "outer_optimizer must be a callable that builds it from the outer parameters, e.g. "
                "outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)"
            )
        self._wrap(inner, verbose)
        self.dht, self.run_id, self.local_steps = dht, run_id, local_steps
        self.batch_size_per_step = batch_size_per_step
        self.matchmaking_time, self.averaging_timeout = float(matchmaking_time), float(averaging_timeout)
        self.load_state_timeout = float(load_state_timeout)
        self.outer_params = [
            torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True), requires_grad=True) for p in self.params
        ]
        self.outer_opt = build_optimizer(outer_optimizer, self.outer_params, "outer_optimizer")
        self.training_state = TrainingState(self.outer_opt, extra_tensors)  # its step is the outer step
        client_mode = dht.client_mode if client_mode is None else bool(client_mode)
        opts = averager_options(self.matchmaking_time, self.averaging_timeout, client_mode, averager_opts)
        self.averager = DecentralizedAverager(
            [torch.zeros(p.shape) for p in self.outer_params], dht, prefix=self.state_prefix(run_id),
            compression=compression, shared_state=self.training_state.shared(), start=True, **opts,
        )  # fmt: skip
        # the run's outer step and each peer's progress toward its next one, for newcomers and `hive peers`
        self.tracker = ProgressTracker(dht, run_id, target_batch_size=local_steps, client_mode=client_mode)
        self.inner_steps = 0  # since the last outer step
        self.samples = 0  # since the last outer step: this peer's weight in the average
        self._round: StepControl | None = None
        self._step_times: collections.deque[float] = collections.deque(maxlen=20)  # recent inner step durations
        self._last_step = time.perf_counter()
        self.rounds_finished = self.rounds_failed = 0
        self.last_group_size = 0
        self.last_round_finished = -math.inf

    @staticmethod
    def state_prefix(run_id: str) -> str:
        """The prefix under which a run's peers average pseudo-gradients and share their state."""
        return f"{run_id}_diloco"

    @staticmethod
    def outer_state(params: Iterable[torch.Tensor], outer_lr: float, outer_momentum: float) -> TrainingState:
        """A stand-in for a DiLoCo peer's shared state, of the same layout, for `hive pull-state`:
        outer parameters (float32 CPU copies of `params`) and a Nesterov SGD's momentum."""
        outer = [torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True)) for p in params]
        return TrainingState(torch.optim.SGD(outer, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0))

    @property
    def local_epoch(self) -> int:
        """Outer steps taken (or loaded from peers)."""
        return self.training_state.step

    @property
    def local_step(self) -> int:  # what hive's Trainer reads, whatever the mode
        return self.training_state.step

    @property
    def lock_parameters(self) -> Any:
        return self.training_state.lock

    def __repr__(self) -> str:
        return f"DiLoCoOptimizer(run_id={self.run_id!r}, inner={self.opt!r}, local_epoch={self.local_epoch})"

    def step(self, closure: Callable[[], Any] | None = None, batch_size: int | None = None) -> Any:  # type: ignore[override]
        """One inner step; every `local_steps` of them, the outer step. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        now = time.perf_counter()
        self._step_times.append(now - self._last_step)
        self._last_step = now
        with self.training_state.lock:
            if self.inner_steps == 0 and self.tracker.global_epoch > self.local_epoch:
                self.load_state_from_peers()  # the run took an outer step without us
            self.opt.step()
            self.inner_steps += 1
            self.samples += batch_size or self.batch_size_per_step or 1
            self.tracker.report_local_progress(self.local_epoch, self.inner_steps)
            self._schedule_round()
            if self.inner_steps >= self.local_steps:
                self._outer_step()
        return loss

    def _schedule_round(self) -> None:
        """Look for the outer step's group while the last inner steps run."""
        if self._round is not None and not self._round.done():
            return
        step_time = sorted(self._step_times)[len(self._step_times) // 2] if self._step_times else 0.0
        if (self.local_steps - self.inner_steps) * step_time <= self.matchmaking_time:
            self._round = self._start_round()

    def _start_round(self) -> StepControl:
        return self.averager.step(  # type: ignore[return-value]
            scope=f"o{self.local_epoch}", scheduled=True, allow_retries=False,
            timeout=self.matchmaking_time + self.averaging_timeout,
            wait=False,
        )  # fmt: skip

    def _outer_step(self) -> None:
        self._log("Outer step #%d after %d inner steps", self.local_epoch, self.inner_steps)
        control = self._round
        if control is None or control.done():
            control = self._start_round()
        self._round = None
        with self.averager.get_tensors() as grads, torch.no_grad():
            for g, outer, p in zip(grads, self.outer_params, self.params, strict=True):
                g.copy_(outer - p.detach().to("cpu", torch.float32))
        try:
            group = finish_round(control, self.samples, self.matchmaking_time, self.averaging_timeout)
            self.rounds_finished += 1
            self.last_group_size = len(group)
            self.last_round_finished = time.monotonic()
            self._log("Averaged pseudo-gradients with %d peers", len(group))
        except (HiveError, TimeoutError) as e:
            self.rounds_failed += 1
            level = logging.INFO if isinstance(e, MatchmakingError) else logging.WARNING
            logger.log(level, "Averaging pseudo-gradients failed: %s; applying this peer's own", e or "timeout")
        with self.averager.get_tensors() as grads, torch.no_grad():
            for g, outer in zip(grads, self.outer_params, strict=True):
                outer.grad = g.clone()
            self.outer_opt.step()
            self.outer_opt.zero_grad(set_to_none=True)
            self._reset_to_outer()
        self.training_state.step += 1
        self.inner_steps = self.samples = 0
        self.tracker.update_epoch(self.local_epoch)
        self.averager.state_sharing_priority = self.local_epoch

    def _reset_to_outer(self) -> None:
        with torch.no_grad():
            for p, outer in zip(self.params, self.outer_params, strict=True):
                p.copy_(outer.to(p.device, p.dtype))

    def load_state_from_peers(self, timeout: float | None = None, max_step: int | None = None) -> bool:
        """Download the run's outer parameters, outer optimizer state (momentum) and outer step
        from a peer, and restart the inner steps from them. False if no peer shared in time."""
        if self._round is not None:
            self._round.cancel()
            self._round = None
        timeout = self.load_state_timeout if timeout is None else timeout
        with self.training_state.lock:
            try:
                loaded = load_training_state(
                    self.averager, self.training_state, timeout=timeout,
                    max_step=self.tracker.epoch_bound(timeout) if max_step is None else max_step,
                )  # fmt: skip
            except HiveError as e:
                logger.warning("Could not load the run's state: %s", e)
                loaded = None
            if loaded is None:
                logger.warning("No peer of run %r shared its state; going on from this peer's", self.run_id)
                return False
            self._reset_to_outer()
            self.inner_steps = self.samples = 0
            self.tracker.update_epoch(self.local_epoch)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.opt.state_dict(),
            "outer": self.outer_opt.state_dict(),
            "outer_params": [p.detach().clone() for p in self.outer_params],
            "local_epoch": self.local_epoch,
            "inner_steps": self.inner_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self.training_state.lock, torch.no_grad():
            self.opt.load_state_dict(state_dict["inner"])
            for outer, value in zip(self.outer_params, state_dict["outer_params"], strict=True):
                outer.copy_(value)
            self.outer_opt.load_state_dict(state_dict["outer"])
            self.training_state.step = int(state_dict["local_epoch"])
            self.inner_steps = int(state_dict.get("inner_steps", 0))
        self.averager.state_sharing_priority = self.local_epoch
        self.tracker.update_epoch(self.local_epoch)

    def discard_round(self) -> None:
        if self._round is not None:
            self._round.cancel()
            self._round = None

    def shutdown(self) -> None:
        """Cancel the round in flight and stop the tracker and averager (the DHT keeps running)."""
        self.discard_round()
        self.tracker.shutdown()
        self.averager.shutdown()
