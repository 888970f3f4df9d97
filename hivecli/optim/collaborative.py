"""`Optimizer`: hivemind 1.x's collaborative optimizer (large-batch training over many peers).

Peers train toward a shared `target_batch_size`: each `step()` adds this peer's batch to the
run's count, which every peer publishes in the DHT (`ProgressTracker`). When the run as a whole
has processed `target_batch_size` samples, the *epoch* ends:

- by default (`use_local_updates=False`), each peer has accumulated its gradients over the
  epoch; the peers average them, weighted by the samples each processed, and all take the
  same optimizer step: synchronous SGD with a very large batch, which tolerates peers joining
  and leaving. The group is found while the epoch's last batches run (the tracker's ETA says
  when), and averaging starts when the gradients are ready;
- with `use_local_updates=True`, each peer steps its optimizer on every call with its own
  gradients, and the parameters are averaged in the background once per epoch.

Every `average_state_every` epochs the parameters (and `average_opt_statistics`) are averaged
too, which brings back in line a peer whose gradient round failed. A peer whose epoch falls
behind the run's loads the state from a peer ("Downloading parameters from peer ...").
Auxiliary peers help average (they reduce a part of each round) without training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from hivecli._exceptions import ConfigError, HiveError, MatchmakingError
from hivecli.averaging.averager import DecentralizedAverager, Stage, StepControl
from hivecli.dht.dht import DHT
from hivecli.optim.state import TrainingState, load_training_state, parameters_of
from hivecli.optim.tracker import ProgressTracker
from hivecli.optim.training_averager import TrainingAverager
from hivecli.optim.wrapper import (
    WrappedOptimizer,
    averager_options,
    build_optimizer,
    check_seconds,
    finish_round,
    wait_for_round,
)
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
_RELOAD_PERIOD = 10.0  # seconds between catch-up downloads that fail (the peer trains meanwhile)
# hivemind 1.x arguments whose job hive does another way; accepted so that its code runs as written
_ACCEPTED_HIVEMIND_ARGS = {
    "delay_optimizer_step", "delay_grad_averaging", "delay_state_averaging", "delay_before_state_averaging",
    "offload_optimizer", "reuse_grad_buffers", "load_state_compression", "shutdown_timeout", "next_chunk_timeout",
    "grad_averager_factory",
}  # fmt: skip


class Optimizer(WrappedOptimizer):
    """hivemind 1.x's `hivemind.Optimizer`: train with peers toward a shared batch size.

    Args:
        dht: a running `hivecli.DHT`.
        run_id: the run's name; peers with the same run_id and model train together.
        target_batch_size: samples the whole run processes per epoch (one global step).
        batch_size_per_step: samples each `step()` adds (or pass `step(batch_size=...)`).
        optimizer: a torch optimizer, or a callable that builds one from `params`.
        params: the parameters to build `optimizer` with, when it is a callable.
        scheduler: a callable that builds an LR scheduler from the optimizer (or a scheduler);
            stepped once per epoch.
        use_local_updates: step on every call with local gradients, average parameters every
            epoch (default: average gradients, then all take the same step).
        matchmaking_time: seconds to gather a group before an epoch ends.
        averaging_timeout: seconds an averaging round may take before it is given up.
        load_state_timeout: seconds to download the state from peers.
        average_state_every: average parameters and state every this many epochs.
        average_opt_statistics: optimizer statistics averaged with the parameters, e.g.
            ("exp_avg_sq",) for Adam.
        extra_tensors: tensors shared with newcomers but not averaged (a model's buffers).
        grad_compression, state_averaging_compression: codecs for the two kinds of round.
        client_mode: never accept connections (default: the DHT's mode).
        auxiliary: help average without training (call `step()` in a loop, with no gradients).
        averager_opts: more `DecentralizedAverager` settings for both averagers
            (target_group_size, min_group_size, request_timeout, bandwidth, ...).
        tracker_opts: more `ProgressTracker` settings (min_refresh_period, ...).
        verbose: log each epoch and round at INFO level, as hivemind does.

    Raises:
        ConfigError: an argument is out of range or the wrong kind (the message names it).
    """

    def __init__(
        self,
        *,
        dht: DHT,
        run_id: str,
        target_batch_size: int,
        batch_size_per_step: int | None = None,
        optimizer: torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer],
        params: Iterable[Any] | None = None,
        scheduler: Any = None,
        use_local_updates: bool = False,
        matchmaking_time: float = 15.0,
        averaging_timeout: float = 60.0,
        load_state_timeout: float = 600.0,
        average_state_every: int = 1,
        average_opt_statistics: Sequence[str] = (),
        extra_tensors: Sequence[torch.Tensor] = (),
        grad_compression: Any = None,
        state_averaging_compression: Any = None,
        client_mode: bool | None = None,
        auxiliary: bool = False,
        averager_opts: dict[str, Any] | None = None,
        tracker_opts: dict[str, Any] | None = None,
        verbose: bool = False,
        **hivemind_kwargs: Any,
    ):
        unknown = set(hivemind_kwargs) - _ACCEPTED_HIVEMIND_ARGS
        if unknown:
            raise ConfigError(f"Optimizer() got an unknown argument {sorted(unknown)[0]!r}")
        _check_positive_int("target_batch_size", target_batch_size)
        if batch_size_per_step is not None:
            _check_positive_int("batch_size_per_step", batch_size_per_step)
        _check_positive_int("average_state_every", average_state_every)
        check_seconds(
            matchmaking_time=matchmaking_time,
            averaging_timeout=averaging_timeout,
            load_state_timeout=load_state_timeout,
        )
        client_mode = dht.client_mode if client_mode is None else bool(client_mode)
        if auxiliary and client_mode:
            raise ConfigError("auxiliary=True with client_mode=True: an auxiliary peer must accept connections")
        self._wrap(build_optimizer(optimizer, params, "optimizer"), verbose)
        self.dht, self.run_id = dht, run_id
        self.target_batch_size, self.batch_size_per_step = target_batch_size, batch_size_per_step
        self.use_local_updates, self.auxiliary = use_local_updates, auxiliary
        self.matchmaking_time, self.averaging_timeout = float(matchmaking_time), float(averaging_timeout)
        self.load_state_timeout, self.average_state_every = float(load_state_timeout), average_state_every
        self.training_state = TrainingState(self.opt, extra_tensors)  # its step is the epoch
        self.scheduler = scheduler(self.opt) if callable(scheduler) else scheduler

        opts = averager_options(self.matchmaking_time, self.averaging_timeout, client_mode, averager_opts)
        self.grads = [torch.zeros(p.shape, dtype=torch.float32) for p in parameters_of(self.opt)]
        self.grad_averager = DecentralizedAverager(
            self.grads, dht, prefix=f"{run_id}_grad_averager", compression=grad_compression,
            allow_state_sharing=False, start=True, **opts,
        )  # fmt: skip
        self.state_averager = TrainingAverager(
            self.opt, dht, prefix=self.state_prefix(run_id), state=self.training_state,
            average_opt_statistics=tuple(average_opt_statistics), compression=state_averaging_compression,
            allow_state_sharing=not (client_mode or auxiliary), start=True, **opts,
        )  # fmt: skip
        self.tracker = ProgressTracker(dht, run_id, target_batch_size, client_mode=client_mode, **(tracker_opts or {}))
        self.samples = 0  # accumulated toward this epoch (its gradients are summed in self.grads)
        self._grad_round: StepControl | None = None  # scheduled for the end of the epoch
        self._state_round: StepControl | None = None  # parameters averaging in the background
        self._state_round_started = 0.0
        self.rounds_finished = 0  # averaging rounds (gradients or state) that averaged with a group
        self.rounds_failed = 0  # that found no group or failed (training went on alone)
        self.last_group_size = 0
        self.last_round_finished = -math.inf  # time.monotonic()
        self._last_progress_log = -math.inf
        self._next_load_attempt = -math.inf  # after a failed catch-up download, the next is not before

    @staticmethod
    def state_prefix(run_id: str) -> str:
        """The prefix under which a run's peers average parameters and share their state."""
        return f"{run_id}_state_averager"

    # ---- what hivemind's users read -------------------------------------------------------------------

    @property
    def local_epoch(self) -> int:
        """This peer's epoch: global optimizer steps taken (or loaded from peers)."""
        return self.training_state.step

    @property
    def local_step(self) -> int:  # the counter hive's Trainer reads, whatever the mode
        return self.training_state.step

    @property
    def lock_parameters(self) -> Any:
        return self.training_state.lock

    @property
    def averager(self) -> TrainingAverager:
        """The averager that shares this peer's state (as DecentralizedOptimizer.averager)."""
        return self.state_averager

    def __repr__(self) -> str:
        return f"Optimizer(run_id={self.run_id!r}, opt={self.opt!r}, local_epoch={self.local_epoch})"

    # ---- step -------------------------------------------------------------------------------------------

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, batch_size: int | None = None, grad_scaler: Any = None
    ) -> Any:
        """Count this batch toward the run's epoch (accumulating its gradients, or stepping at once
        with use_local_updates); when the run reaches target_batch_size, average and take the
        epoch's step. Returns the closure's loss, if given.

        Raises:
            ConfigError: no batch size is known, or a grad_scaler is passed (not supported).
        """
        if grad_scaler is not None:
            raise ConfigError("grad_scaler is not supported; unscale the gradients before step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.auxiliary:
            self._auxiliary_step()
            return loss
        batch_size = self.batch_size_per_step if batch_size is None else batch_size
        if batch_size is None:
            raise ConfigError("pass batch_size_per_step= to Optimizer() or step(batch_size=...)")
        _check_positive_int("batch_size", batch_size)
        with self.training_state.lock:
            self._apply_state_round()
            if self._behind() and time.monotonic() >= self._next_load_attempt:
                if self.load_state_from_peers():
                    return loss  # this batch's gradients belong to parameters that are gone
                self._next_load_attempt = time.monotonic() + _RELOAD_PERIOD  # meanwhile, train on
            if self.use_local_updates:
                self.opt.step()
            else:
                self._accumulate(batch_size)
            self.samples += batch_size
            self.tracker.report_local_progress(self.local_epoch, self.samples)
            self._log_progress()
            if not self.use_local_updates:
                self._schedule_grad_round()
            if self.tracker.ready_to_update_epoch:
                self._end_epoch()
        return loss

    def _behind(self) -> bool:
        """The run has moved on without this peer: it missed an epoch's step (more than one
        behind, or one behind with nothing accumulated toward the epoch the others closed)."""
        gap = self.tracker.global_epoch - self.local_epoch
        return gap > 1 or (gap == 1 and self.samples == 0)

    def _accumulate(self, batch_size: int) -> None:
        """Add this batch's gradient, weighted by its size: the epoch's gradient is their mean."""
        with self.grad_averager.get_tensors() as grads:
            for param, acc in zip(parameters_of(self.opt), grads, strict=True):
                if param.grad is not None:
                    acc.add_(param.grad.detach().to("cpu", torch.float32), alpha=batch_size)

    def _schedule_grad_round(self) -> None:
        """Look for the epoch's group while its last batches run: once the ETA is near. A search
        that ended without a group (nobody else near the end yet) is started again."""
        if self._grad_round is not None and not self._grad_round.done():
            return
        eta = self.tracker.estimated_next_update_time - get_dht_time()
        if eta <= self.matchmaking_time:
            self._log("Pre-scheduling gradient averaging round in %.2f sec", max(0.0, eta))
            self._grad_round = self._start_grad_round()

    def _start_grad_round(self) -> StepControl:
        timeout = self.matchmaking_time + self.averaging_timeout
        return self.grad_averager.step(  # type: ignore[return-value]
            scope=f"e{self.local_epoch}", scheduled=True, timeout=timeout, wait=False, allow_retries=False
        )

    def _take_grad_round(self) -> StepControl:
        """The epoch's scheduled gradient round, or a new one if it was never scheduled or its
        search ended without a group."""
        control = self._grad_round
        if control is None or control.done():
            control = self._start_grad_round()
        self._grad_round = None
        return control

    def _end_epoch(self) -> None:
        """The run reached target_batch_size: average gradients (unless local updates), step,
        average state every average_state_every epochs, step the scheduler, move on."""
        epoch = self.local_epoch
        self._log("Beginning optimizer step #%d", epoch)
        if not self.use_local_updates:
            self._settle_state_round()
            self._average_gradients()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.training_state.step = max(epoch + 1, self.tracker.global_epoch)
        if self.scheduler is not None:
            self.scheduler.step()
        self.samples = 0
        self.tracker.update_epoch(self.local_epoch)
        self.state_averager.state_sharing_priority = self.local_epoch
        if self.local_epoch % self.average_state_every == 0:
            self._start_state_round()
        self._log("Transitioning to epoch %d", self.local_epoch)

    def _settle_state_round(self) -> None:
        """Before a gradient step, apply the parameters round in flight, as every peer of its group
        does: (p - lr g) + (avg - p) is not bitwise avg - lr g, and the peers must stay identical.
        A round still without a group gets the rest of its matchmaking time, then is dropped
        (the peers it waited for have moved on). With local updates, rounds just run on: the
        delta rule keeps the steps taken meanwhile."""
        control = self._state_round
        if control is None:
            return
        grace = 2 * self.matchmaking_time - (time.perf_counter() - self._state_round_started)
        if control.stage in (Stage.IDLE, Stage.LOOKING_FOR_GROUP) and grace > 0:
            with contextlib.suppress(Exception):  # its failure is logged when it is applied
                control.result(grace)
        if control.stage in (Stage.IDLE, Stage.LOOKING_FOR_GROUP) and not control.done():
            logger.info("The parameters round of epoch %d found no group in time; dropped it", self.local_epoch)
            self.discard_round(control)
            return
        try:
            self.wait_for_averaging(self.averaging_timeout)
        except TimeoutError:
            self.discard_round(control)

    def _average_gradients(self) -> None:
        """Average the epoch's mean gradient with the group, weighted by samples, into `.grad`.
        On failure the local gradient is used ("Proceeding with local gradients")."""
        control = self._take_grad_round()
        with self.grad_averager.get_tensors() as grads:
            for acc in grads:
                acc.div_(max(1, self.samples))
        try:
            group = finish_round(control, self.samples, self.matchmaking_time, self.averaging_timeout)
            self._round_done(len(group))
            self._log("Averaged gradients with %d peers", len(group))
        except (HiveError, TimeoutError) as e:
            self.rounds_failed += 1
            level = logging.INFO if isinstance(e, MatchmakingError) else logging.WARNING
            logger.log(level, "Averaging gradients failed: %s; proceeding with local gradients", e or "timeout")
        with self.grad_averager.get_tensors() as grads:
            for param, acc in zip(parameters_of(self.opt), grads, strict=True):
                param.grad = acc.to(param.device, param.dtype, copy=True)
                acc.zero_()

    # ---- state averaging (in the background) -----------------------------------------------------------

    def _start_state_round(self) -> None:
        if self._state_round is not None:
            return  # the last one is still running: this epoch's is skipped
        if not self.state_averager.snapshot():
            logger.warning("Not averaging at epoch %d: this peer's parameters are not finite", self.local_epoch)
            return
        self._log("Starting a new averaging round with current parameters.")
        self._state_round_started = time.perf_counter()
        timeout = 2 * self.matchmaking_time  # to find a group; the all-reduce has averaging_timeout
        # with local updates, peers a little apart in epochs average too (as hivemind's do); in
        # lockstep gradient training, only peers of the same epoch
        scope = "" if self.use_local_updates else f"e{self.local_epoch}"
        self._state_round = self.state_averager.step(  # type: ignore[assignment]
            scope=scope, timeout=timeout, wait=False
        )

    def _apply_state_round(self) -> bool:
        control = self._state_round
        if control is None or not control.done():
            return False
        self._state_round = None
        try:
            group = control.result()
        except (HiveError, TimeoutError) as e:
            self.rounds_failed += 1
            level = logging.INFO if isinstance(e, MatchmakingError) else logging.WARNING
            logger.log(level, "Averaging parameters failed: %s; going on with local parameters", e or "timeout")
            return False
        self.state_averager.apply_delta()
        self._round_done(len(group))
        elapsed = time.perf_counter() - self._state_round_started
        self._log("Finished averaging round in %.2f s with %d peers.", elapsed, len(group))
        return True

    def _round_done(self, group_size: int) -> None:
        self.rounds_finished += 1
        self.last_group_size = group_size
        self.last_round_finished = time.monotonic()

    def wait_for_averaging(self, timeout: float | None = None) -> bool:
        """Wait for the parameters round in flight, if any, and apply it. True if one was applied.

        Raises:
            TimeoutError: it is still running after `timeout` seconds.
        """
        if self._state_round is None:
            return False
        wait_for_round(self._state_round, timeout)  # its failure is logged when it is applied
        with self.training_state.lock:
            return self._apply_state_round()

    # ---- auxiliary peers -------------------------------------------------------------------------------

    def _auxiliary_step(self) -> None:
        """Join each epoch's gradient round with weight 0: reduce a part, contribute nothing."""
        if self.tracker.global_epoch > self.local_epoch + 1:
            self.training_state.step = self.tracker.global_epoch  # nothing of ours to keep in sync
            self.tracker.update_epoch(self.local_epoch)
        self._schedule_grad_round()
        if not self.tracker.ready_to_update_epoch:
            self.tracker.wait_for_update(timeout=min(1.0, self.matchmaking_time))
            return
        control = self._take_grad_round()
        with self.grad_averager.get_tensors() as grads:
            for acc in grads:
                acc.zero_()
        try:
            group = finish_round(control, 0.0, self.matchmaking_time, self.averaging_timeout)
            self._round_done(len(group))
            self._log("Helped average gradients of epoch %d with %d peers", self.local_epoch, len(group))
        except (HiveError, TimeoutError) as e:
            self.rounds_failed += 1
            logger.info("Auxiliary averaging round failed: %s", e or "timeout")
        self.training_state.step = max(self.local_epoch + 1, self.tracker.global_epoch)
        self.tracker.update_epoch(self.local_epoch)

    # ---- state -------------------------------------------------------------------------------------------

    def load_state_from_peers(self, timeout: float | None = None, max_step: int | None = None) -> bool:
        """Download the run's parameters, optimizer state and epoch from a peer, and drop what
        this peer accumulated toward its own epoch. False if no peer shared its state in time."""
        for control in (self._grad_round, self._state_round):
            if control is not None:
                control.cancel()
        self._grad_round = self._state_round = None
        timeout = self.load_state_timeout if timeout is None else timeout
        bound = self.tracker.epoch_bound(timeout) if max_step is None else max_step
        with self.training_state.lock:
            try:
                loaded = load_training_state(self.state_averager, self.training_state, timeout=timeout, max_step=bound)
            except HiveError as e:
                logger.warning("Could not load the run's state: %s", e)
                loaded = None
            self.samples = 0
            with self.grad_averager.get_tensors() as grads:
                for acc in grads:
                    acc.zero_()
            if loaded is None:
                logger.warning("No peer of run %r shared its state; going on from this peer's", self.run_id)
                return False
            self._sync_scheduler()
            self.tracker.update_epoch(self.local_epoch)
        return True

    def _sync_scheduler(self) -> None:
        """After a download, the scheduler is where a peer that took every epoch's step would be."""
        if self.scheduler is None or not hasattr(self.scheduler, "last_epoch"):
            return
        while self.scheduler.last_epoch < self.local_epoch:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {**self.opt.state_dict(), "local_epoch": self.local_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        epoch = state_dict.pop("local_epoch", self.local_epoch)
        with self.training_state.lock:
            self.opt.load_state_dict(state_dict)
            self.state_averager.refresh_sources()
            self.training_state.step = int(epoch)
        self.state_averager.state_sharing_priority = self.local_epoch
        self.tracker.update_epoch(self.local_epoch)

    def _log_progress(self) -> None:
        if not self.verbose or time.monotonic() - self._last_progress_log < 5.0:
            return
        self._last_progress_log = time.monotonic()
        g = self.tracker.global_progress
        logger.info(
            "%s accumulated %d samples for epoch #%d from %d peers. ETA %.2f sec",
            self.run_id, g.samples_accumulated, g.epoch, g.num_peers, max(0.0, g.eta_next_epoch - get_dht_time()),
        )  # fmt: skip

    # ---- the end ------------------------------------------------------------------------------------------

    def discard_round(self, control: StepControl | None = None) -> None:
        """Cancel `control`, or every round in flight; their results are not applied."""
        for pending in (self._grad_round, self._state_round):
            if pending is not None and control in (None, pending):
                pending.cancel()
        if control is None or control is self._grad_round:
            self._grad_round = None
        if control is None or control is self._state_round:
            self._state_round = None

    def shutdown(self) -> None:
        """Cancel the rounds in flight and stop the tracker and averagers (the DHT keeps running)."""
        self.discard_round()
        self.tracker.shutdown()
        self.grad_averager.shutdown()
        self.state_averager.shutdown()


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} = {value!r}: must be an integer >= 1")
