"""`TrainingState`: what a training peer shares with newcomers, and its step counter.

The state is the model's parameters, extra tensors (its buffers, such as BatchNorm's running
statistics) and every tensor of the optimizer's state, with the step counter and the
optimizer's other entries as metadata. Each optimizer of hivecli.optim owns one: its `step` is
the one counter of the peer's progress (a local step, a collaborative epoch, a DiLoCo outer
step), its `lock` is held whenever the model changes, and `shared()` is what the averager hands
to newcomers. `load_training_state()` downloads a donor's state, checks it against this one
and applies it.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from hivecli._exceptions import ConfigError, HiveError
from hivecli.averaging.averager import DecentralizedAverager, StateValidator
from hivecli.averaging.state import SharedState, StateSnapshot

logger = logging.getLogger(__name__)
MAX_STEP = 2**62  # a step beyond any run's, below int64's limit: the default bound on a loaded step


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if no tensor holds a NaN or an infinity."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def parameters_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def initialize_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Make the optimizer create its state now (most create it lazily on the first step), so
    that statistics can be averaged and every peer has a state of the same shape.

    Runs one step with zero gradients, weight decay off, then restores the parameters,
    gradients, hyper-parameters and any state that existed, and zeroes the new step counters:
    the new state is what a fresh optimizer's would be after creation.
    """
    params = parameters_of(opt)
    if all(opt.state.get(p) for p in params):
        return
    existing = {p: copy.deepcopy(opt.state[p]) for p in params if opt.state.get(p)}  # a resumed optimizer's
    saved_params = [p.detach().clone() for p in params]
    saved_grads = [p.grad for p in params]
    saved_groups = [dict(group) for group in opt.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in opt.param_groups:
            if "weight_decay" in group:
                group["weight_decay"] = 0.0
        opt.step()
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params, strict=True):
                p.copy_(saved)
        for p, grad in zip(params, saved_grads, strict=True):
            p.grad = grad
        for group, saved_group in zip(opt.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
    for p in params:
        if p in existing:
            opt.state[p] = existing[p]
            continue
        state = opt.state.get(p, {})
        if "step" in state:
            step = state["step"]
            state["step"] = step.zero_() if isinstance(step, torch.Tensor) else 0


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[list[Any]]]:
    """Every tensor of the optimizer's state in a fixed order, and the other entries as
    [parameter index, key, value] (msgpack-able metadata)."""
    tensors, other = [], []
    for index, p in enumerate(parameters_of(opt)):
        state = opt.state.get(p, {})
        for key in sorted(state):
            value = state[key]
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, (int, float, bool, str)) or value is None:
                other.append([index, key, value])
    return tensors, other


class TrainingState:
    """A training peer's shareable state: `opt`'s parameters and state, `extra_tensors`, `step`.

    Args:
        opt: the optimizer whose parameters and state are shared; its state is created here if
            it does not exist yet (see `initialize_optimizer_state`).
        extra_tensors: more tensors that travel with the state but are not averaged, such as a
            model's buffers.
        lock: held by the training loop while it changes the model (default: a new RLock).
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        extra_tensors: Sequence[torch.Tensor] = (),
        lock: threading.RLock | None = None,  # type: ignore[valid-type]
    ):
        self.opt = opt
        self.extra_tensors = [t.detach() for t in extra_tensors]
        self.lock = lock or threading.RLock()
        self.step = 0
        # what the owner wants newcomers to get besides the step (hive's Trainer puts the run's
        # sample counts here); plain msgpack-able data
        self.run_metadata: dict[str, Any] = {}
        self.loaded_run: Any = None  # the run metadata of the last state loaded from a peer
        initialize_optimizer_state(opt)

    def tensors(self) -> list[torch.Tensor]:
        """Parameters, extra tensors, optimizer tensors: the shared tensors, in a fixed order."""
        opt_tensors, _ = optimizer_state_tensors(self.opt)
        params = [p.detach() for p in parameters_of(self.opt)]
        return params + self.extra_tensors + [t.detach() for t in opt_tensors]

    def get(self) -> StateSnapshot:
        """(metadata, tensors) as a donor serves them; call with `lock` held."""
        _, other = optimizer_state_tensors(self.opt)
        return {"step": self.step, "optimizer_state": other, "run": self.run_metadata}, self.tensors()

    def shared(self) -> SharedState:
        return SharedState(self.get, self.lock, finite_only=True)

    def local_entries(self) -> dict[tuple[int, str], Any]:
        """(parameter index, key) -> value of the local optimizer's non-tensor state entries."""
        return {(index, key): value for index, key, value in optimizer_state_tensors(self.opt)[1]}

    def apply(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        """Take a downloaded state, checked by `check_metadata` and the download."""
        with self.lock, torch.no_grad():
            for target, value in zip(self.tensors(), tensors, strict=True):
                target.copy_(value.to(target.device))
            params = parameters_of(self.opt)
            for index, key, value in metadata.get("optimizer_state", []):  # checked: known keys, same types
                self.opt.state[params[index]][key] = value
            self.step = metadata["step"]
            self.loaded_run = metadata.get("run")

    def check_state_metadata(
        self, metadata: Any, max_step: int = MAX_STEP, local: dict[tuple[int, str], Any] | None = None
    ) -> None:
        """Check a donor's metadata against this optimizer before any of it is applied.

        The step must be an int in [0, max_step]; "run" a dict if present; "optimizer_state" a
        list of [parameter index, key, value] whose (index, key) the local optimizer has as a
        non-tensor entry too, with a value of the same type (an int or a finite float for a
        float): a donor can neither add keys nor replace a tensor statistic by a number.
        The shapes and dtypes of the state's tensors are checked by the download itself.
        `local` is `local_entries()`, read beforehand if the optimizer may be stepping.

        Raises:
            HiveError: what is wrong, in one sentence (the donor is then skipped and banned).
        """
        if not isinstance(metadata, dict):
            raise HiveError(f"its metadata is a {type(metadata).__name__}, not a dict")
        step = metadata.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= max_step:
            raise HiveError(f"its step {str(step)[:40]} is not an integer in [0, {max_step}]")
        if not isinstance(metadata.get("run", {}), dict):
            raise HiveError("its run metadata is not a dict")
        entries = metadata.get("optimizer_state", [])
        if not isinstance(entries, list):
            raise HiveError("its optimizer_state is not a list")
        local = self.local_entries() if local is None else local
        for entry in entries:
            known = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
            if not (known and isinstance(entry[1], str) and (entry[0], entry[1]) in local):
                raise HiveError(f"its optimizer state entry {str(entry)[:60]} is not one this optimizer has")
            if not _same_kind(entry[2], local[entry[0], entry[1]]):
                raise HiveError(
                    f"its optimizer state entry {str(entry)[:60]} holds a {type(entry[2]).__name__} where this "
                    f"optimizer has a {type(local[entry[0], entry[1]]).__name__}"
                )


def load_training_state(
    averager: DecentralizedAverager,
    state: TrainingState,
    timeout: float | None = None,
    progress: Any = None,
    validate: StateValidator | None = None,
    max_step: int | None = None,
) -> tuple[Any, list[torch.Tensor]] | None:
    """Download the run's state through `averager` (whose shared state is `state.shared()`),
    check it, apply it to `state`, and return (metadata, tensors); None if nobody shares.

    A donor's metadata is checked strictly first (`check_state_metadata`, then the caller's
    `validate(metadata, tensors)` if given); a donor that fails is logged, banned for a while
    and the next one is tried. `max_step` bounds the step a donor may claim (default 2**62):
    pass the run's total steps, so that a donor claiming the run is over is refused.

    Raises:
        ConfigError: max_step is not an int >= 0.
    """
    bound = MAX_STEP if max_step is None else max_step
    if not isinstance(bound, int) or isinstance(bound, bool) or bound < 0:
        raise ConfigError(f"max_step = {max_step!r} must be an integer >= 0 or None")
    with state.lock:  # the local structure, read here on the caller's thread, not the DHT's
        local = state.local_entries()

    def check(metadata: Any, tensors: list[torch.Tensor]) -> None:
        state.check_state_metadata(metadata, bound, local)
        if validate is not None:
            validate(metadata, tensors)

    # the download itself (a TrainingAverager's own load_state_from_peers calls this function)
    loaded = DecentralizedAverager.load_state_from_peers(averager, True, timeout, progress, check)
    if loaded is None:
        return None
    metadata, tensors = loaded  # type: ignore[misc]
    state.apply(metadata, tensors)
    averager.state_sharing_priority = state.step
    logger.debug("Loaded the run's state at step %d", state.step)
    return metadata, tensors


def _same_kind(value: Any, local: Any) -> bool:
    """A downloaded non-tensor optimizer entry may replace `local`: same type, and a finite number."""
    if isinstance(local, bool) or local is None:
        return type(value) is type(local)
    if isinstance(local, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(local, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str) and isinstance(local, str) and len(value) <= 1024
