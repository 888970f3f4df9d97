"""`DecentralizedOptimizer`: wrap any torch optimizer so that peers average as they train.

Every `step()` runs the local optimizer step at once. Every `averaging_steps_period` steps
(and, if set, once per `averaging_time_period` of DHT time) it also snapshots the model and
starts an averaging round in the background; a later `step()` applies the round's result
with the delta rule, so the training loop never waits on the network and keeps the local
updates it made meanwhile. Failed rounds (nobody online, a peer gone) are logged and training
goes on alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hivecli._exceptions import ConfigError, HiveError, MatchmakingError
from hivecli.averaging.averager import StepControl
from hivecli.dht.dht import DHT
from hivecli.optim.state import TrainingState
from hivecli.optim.training_averager import TrainingAverager
from hivecli.optim.wrapper import WrappedOptimizer, wait_for_round
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
_PRIORITY_PERIOD = 10.0  # seconds between updates of our donor priority (the step) in the DHT


class DecentralizedOptimizer(WrappedOptimizer):
    """A torch optimizer that averages with other peers of the same run in the background.

    Args:
        opt: the optimizer to wrap (any `torch.optim.Optimizer`); create it first, then this.
        dht: a running `hivecli.DHT` connected to the run's peers.
        prefix: the run's name; peers with the same prefix and model average together.
        target_group_size: largest group to average in.
        average_parameters: average the model's parameters (default True).
        average_gradients: average the gradients present at a round's start; the change is
            added to the gradients of the step that applies the round (default False).
        average_opt_statistics: optimizer state to average too, e.g. ("exp_avg_sq",) for Adam.
        averaging_steps_period: start a round every this many steps (default 1).
        averaging_time_period: if > 0, start at most one round per this many seconds, aligned
            on DHT time so that peers start together (default 0: no limit).
        timeout: seconds a round may look for a group (default: the averager's step_timeout).
        verbose: log every round at INFO level ("Starting a new averaging round ...").
        averager_kwargs: passed to the `TrainingAverager`: extra_tensors (e.g. the model's
            buffers, shared with newcomers but not averaged) and `DecentralizedAverager`'s
            (min_group_size, compression, min_matchmaking_time, request_timeout, client_mode, ...).

    Raises:
        ConfigError: an argument is out of range or names a statistic the optimizer lacks.
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        dht: DHT,
        *,
        prefix: str,
        target_group_size: int,
        average_parameters: bool = True,
        average_gradients: bool = False,
        average_opt_statistics: Iterable[str] = (),
        averaging_steps_period: int = 1,
        averaging_time_period: float = 0,
        timeout: float | None = None,
        verbose: bool = False,
        **averager_kwargs: Any,
    ):
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(f"opt is a {type(opt).__name__}; pass a torch.optim.Optimizer such as torch.optim.SGD")
        if not isinstance(averaging_steps_period, int) or averaging_steps_period < 1:
            raise ConfigError(f"averaging_steps_period = {averaging_steps_period!r}: must be an integer >= 1")
        if not (math.isfinite(averaging_time_period) and averaging_time_period >= 0):
            raise ConfigError(f"averaging_time_period = {averaging_time_period!r}: must be a number of seconds >= 0")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout = {timeout!r}: must be a positive number of seconds or None")
        if isinstance(average_opt_statistics, str):
            average_opt_statistics = (average_opt_statistics,)
        self._wrap(opt, verbose)
        self.averaging_steps_period, self.averaging_time_period = averaging_steps_period, averaging_time_period
        self.timeout = timeout
        self.lock_parameters = threading.RLock()
        self.averager = TrainingAverager(
            opt,
            dht,
            prefix=prefix,
            target_group_size=target_group_size,
            average_parameters=average_parameters,
            average_gradients=average_gradients,
            average_opt_statistics=tuple(average_opt_statistics),
            lock_parameters=self.lock_parameters,
            start=True,
            **averager_kwargs,
        )
        self.dht = dht
        self._round: StepControl | None = None
        self._round_started = 0.0
        self._next_round_time = 0.0
        self._priority_updated = -math.inf
        self.rounds_finished = 0  # rounds whose average was applied
        self.rounds_failed = 0  # rounds that found no group or failed (training went on alone)
        self.rounds_refused = 0  # rounds not started because our own values were not finite
        self.last_group_size = 0  # peers in the last applied round, this one included
        self.last_round_finished = -math.inf  # time.monotonic() when it was applied

    @property
    def training_state(self) -> TrainingState:
        """The state newcomers download, and the owner of the step counter."""
        return self.averager.state

    def load_state_from_peers(self, timeout: float | None = None, max_step: int | None = None) -> bool:
        """Download the run's parameters, optimizer state and step from a peer (dropping the round
        in flight, whose start is gone). False if no peer shared its state in time.
        See `TrainingAverager.load_state_from_peers`."""
        self.discard_round()
        return self.averager.load_state_from_peers(timeout=timeout, max_step=max_step) is not None

    @property
    def local_step(self) -> int:
        """Optimizer steps taken by this peer (or loaded from the run by load_state_from_peers)."""
        return self.averager.local_step

    # ---- the torch.optim.Optimizer interface -------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Apply a finished averaging round, if any, take a local step, and start a new round
        in the background when one is due. Returns what the wrapped optimizer's step returns."""
        with self.lock_parameters:
            self._apply_finished_round()
            loss = self.opt.step(closure) if closure is not None else self.opt.step()
            self.averager.state.step += 1
            self._advertise_step()
            if self._round_due():
                self._start_round()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self.lock_parameters:
            self.opt.load_state_dict(state_dict)  # new state tensors: the averaged statistics must follow
            self.averager.refresh_sources()

    def __repr__(self) -> str:
        return f"DecentralizedOptimizer(prefix={self.averager.prefix!r}, opt={self.opt!r})"

    # ---- averaging rounds ----------------------------------------------------------------------------

    def _advertise_step(self) -> None:
        """Donors are tried highest priority first: ours is our step, so that newcomers load from
        the peer furthest along. Each change is a DHT store, hence at most one per period."""
        if time.monotonic() - self._priority_updated > _PRIORITY_PERIOD:
            self._priority_updated = time.monotonic()
            self.averager.state_sharing_priority = self.local_step

    def _round_due(self) -> bool:
        if self._round is not None or self.local_step % self.averaging_steps_period != 0:
            return False
        return self.averaging_time_period == 0 or get_dht_time() >= self._next_round_time

    def _start_round(self, timeout: float | None = None) -> None:
        if self.averaging_time_period:
            period = self.averaging_time_period
            self._next_round_time = (math.floor(get_dht_time() / period) + 1) * period
        if not self.averager.snapshot():
            self.rounds_refused += 1
            logger.warning("Not averaging at step %d: this peer's parameters are not finite", self.local_step)
            return
        self._log("Starting a new averaging round with current parameters.")
        self._round_started = time.perf_counter()
        timeout = self.timeout if timeout is None else timeout
        self._round = self.averager.step(timeout=timeout, wait=False)  # type: ignore[assignment]

    def _apply_finished_round(self) -> bool:
        control = self._round
        if control is None or not control.done():
            return False
        self._round = None
        try:
            group = control.result()
        except MatchmakingError as e:  # nobody (else) online: normal for a lone peer, so not a warning
            self.rounds_failed += 1
            logger.info("Averaging round found no group: %s; training goes on with local parameters", e)
            return False
        except (HiveError, TimeoutError) as e:
            self.rounds_failed += 1
            logger.warning("Averaging round failed: %s; training goes on with local parameters", e)
            return False
        except Exception as e:  # a bug in a round must not stop training
            self.rounds_failed += 1
            logger.exception("Averaging round failed unexpectedly: %s", e)
            return False
        self.averager.apply_delta()
        self.rounds_finished += 1
        self.last_group_size = len(group)
        self.last_round_finished = time.monotonic()
        elapsed = time.perf_counter() - self._round_started
        self._log("Finished averaging round in %.2f s with %d peers.", elapsed, len(group))
        return True

    def wait_for_averaging(self, timeout: float | None = None) -> bool:
        """Wait for the round in flight, if any, and apply it now. True if a round was applied.

        Raises:
            TimeoutError: the round is still running after `timeout` seconds.
        """
        if self._round is None:
            return False
        wait_for_round(self._round, timeout)  # its failure is logged when it is applied
        with self.lock_parameters:
            return self._apply_finished_round()

    def average_now(self, timeout: float) -> bool:
        """Finish the round in flight, then average once more with whoever is ready within
        `timeout` seconds, and apply it. For the end of training: peers that finish together
        leave with the same averaged model. True if the last round averaged with someone.

        Raises:
            TimeoutError: the round in flight did not finish within `timeout`.
        """
        self.wait_for_averaging(timeout)
        with self.lock_parameters:
            self._start_round(timeout=timeout)
        return self.wait_for_averaging(timeout + self.averager.settings.allreduce_timeout)

    def discard_round(self) -> None:
        """Cancel the round in flight, if any; its result will not be applied (after a rollback,
        the parameters it was started from are gone)."""
        if self._round is not None:
            self._round.cancel()
            self._round = None

    def shutdown(self) -> None:
        """Cancel the round in flight and stop the averager (the DHT keeps running)."""
        self.discard_round()
        self.averager.shutdown()
