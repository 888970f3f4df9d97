"""What hive's three optimizers share: they look like the torch optimizer they wrap.

`DecentralizedOptimizer`, `Optimizer` and `DiLoCoOptimizer` each wrap a torch optimizer (the
inner one, for DiLoCo) and are torch optimizers themselves, so that LR schedulers, gradient
clipping and code that edits `param_groups` work on them unchanged: `param_groups` and `state`
are the wrapped optimizer's, and torch's hook dictionaries exist. Each keeps its progress in
one `TrainingState` (hivecli.optim.state), whose `step` it counts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hivecli._exceptions import ConfigError, MatchmakingError
from hivecli.averaging.averager import Stage, StepControl

logger = logging.getLogger(__name__)
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


class WrappedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose groups and state are those of `self.opt`. Subclasses set `opt`
    (with `_wrap`) and implement `step`."""

    opt: torch.optim.Optimizer
    verbose: bool = False

    def _wrap(self, opt: torch.optim.Optimizer, verbose: bool) -> None:
        self.opt = opt
        self.defaults = opt.defaults
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", {})
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable[..., Any]] = {}
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable[..., Any]] = {}
        self.verbose = verbose
        if verbose:
            show_info_logs()

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:  # the wrapped optimizer's, even after load_state_dict
        return self.opt.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.opt.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.opt.state

    @state.setter
    def state(self, value: Any) -> None:
        self.opt.state = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ConfigError(
            f"{type(self).__name__} cannot add parameter groups after it starts averaging; "
            f"add them to the wrapped optimizer before creating the {type(self).__name__}"
        )

    def _log(self, message: str, *args: Any) -> None:
        logger.log(logging.INFO if self.verbose else logging.DEBUG, message, *args)


def check_seconds(**values: Any) -> None:
    """Raises ConfigError naming the first value that is not a positive, finite number of seconds."""
    for name, value in values.items():
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} = {value!r}: must be a positive number of seconds")


def averager_options(
    matchmaking_time: float, averaging_timeout: float, client_mode: bool, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """DecentralizedAverager settings of an epoch-based optimizer: the whole run in one group (all
    peers take the same step), groups gathered for matchmaking_time, then `overrides`."""
    return {
        "target_group_size": 64,
        "min_matchmaking_time": matchmaking_time,
        "request_timeout": min(3.0, matchmaking_time / 2),
        "allreduce_timeout": averaging_timeout,
        "client_mode": client_mode,
        **(overrides or {}),
    }


def wait_for_round(control: StepControl, timeout: float | None) -> None:
    """Wait until a round in flight is done (its failure, if any, is the caller's to read).

    Raises:
        TimeoutError: it is still running after `timeout` seconds.
    """
    try:
        control.result(timeout)
    except Exception:  # only a timeout concerns us here
        if not control.done():
            raise TimeoutError(f"the averaging round did not finish within {timeout} s") from None


def finish_round(control: StepControl, weight: float, matchmaking_time: float, averaging_timeout: float) -> Any:
    """Let a scheduled round average now, with `weight`, and wait for it: at most
    `matchmaking_time` more for its group to form (the peers it was waiting for may have left),
    then at most `averaging_timeout` for the all-reduce. Returns the group's gathered data.

    Raises:
        MatchmakingError: no group formed in time (it is cancelled). HiveError: the round
            failed. TimeoutError: the all-reduce took longer (it is cancelled).
    """
    control.allow_allreduce(weight=weight)
    deadline = time.monotonic() + matchmaking_time
    while control.stage in (Stage.IDLE, Stage.LOOKING_FOR_GROUP) and not control.done():
        if time.monotonic() >= deadline:
            control.cancel()
            raise MatchmakingError(f"no group formed within {matchmaking_time:g} s of the end of the epoch")
        with contextlib.suppress(concurrent.futures.TimeoutError, TimeoutError):
            control.result(timeout=0.05)
    try:
        return control.result(timeout=averaging_timeout)
    except (concurrent.futures.TimeoutError, TimeoutError):
        control.cancel()
        raise TimeoutError(f"the all-reduce did not finish within {averaging_timeout:g} s") from None


def build_optimizer(optimizer: Any, params: Iterable[Any] | None, name: str) -> torch.optim.Optimizer:
    """`optimizer` itself if it is a torch optimizer, else `optimizer(params)` (hivemind 1.x's
    `optimizer=lambda params: torch.optim.Adam(params)` with `params=model.parameters()`).

    Raises:
        ConfigError: neither, or a factory without params, or params without a factory.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        if params is not None:
            raise ConfigError(f"pass either {name}=<a torch optimizer> or params= with {name}=<a callable>, not both")
        return optimizer
    if not callable(optimizer):
        raise ConfigError(
            f"{name} is a {type(optimizer).__name__}; pass a torch optimizer or a callable that builds one "
            f"from params, e.g. {name}=lambda params: torch.optim.SGD(params, lr=0.1)"
        )
    if params is None:
        raise ConfigError(f"{name} is a callable: pass params= (e.g. params=model.parameters()) to build it with")
    built = optimizer(list(params))
    if not isinstance(built, torch.optim.Optimizer):
        raise ConfigError(f"{name}(params) returned a {type(built).__name__}, not a torch.optim.Optimizer")
    return built


def show_info_logs() -> None:
    """verbose=True should print without the user configuring logging, as the quick-start shows."""
    package_logger = logging.getLogger("hivecli")
    if package_logger.level == logging.NOTSET or package_logger.level > logging.INFO:
        package_logger.setLevel(logging.INFO)
    if not package_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", "%Y-%m-%d %H:%M:%S"))
        package_logger.addHandler(handler)
