"""`TrainingAverager`: a `DecentralizedAverager` over a model's parameters and optimizer state.

The averaged tensors are float32 CPU copies of the chosen *sources* (parameters, gradients,
named optimizer statistics), so models may live on any device and in any dtype. A round goes:
`snapshot()` copies the sources in and remembers them, `step()` averages the copies with the
group, and `apply_delta()` adds `average - snapshot` to each source: local updates made while
the round was in flight are kept (the delta rule).

Its shared state is the whole training state: parameters plus every optimizer state tensor,
with the step counter and the optimizer's non-tensor state as metadata.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from hivecli._exceptions import ConfigError, HiveError
from hivecli.averaging.averager import DecentralizedAverager, StateValidator
from hivecli.averaging.state import StateSnapshot
from hivecli.dht.dht import DHT

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


class TrainingAverager(DecentralizedAverager):
    """Averages parameters, gradients and optimizer statistics of `opt` with other peers.

    Args:
        opt: the wrapped optimizer; its state is created here if it does not exist yet.
        dht: a running `hivecli.DHT`.
        average_parameters, average_gradients: which of each parameter's tensors to average.
        average_opt_statistics: names of per-parameter optimizer state to average too, such
            as "exp_avg_sq" for Adam.
        lock_parameters: held by the training loop while it changes the model; state sharing
            takes it to copy a consistent state.
        extra_tensors: more tensors that travel with the shared state but are not averaged,
            such as a model's buffers (BatchNorm running statistics).
        other keyword arguments: see `DecentralizedAverager`.

    Raises:
        ConfigError: nothing to average, or a statistic the optimizer does not have.
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        dht: DHT,
        *,
        average_parameters: bool = True,
        average_gradients: bool = False,
        average_opt_statistics: Iterable[str] = (),
        lock_parameters: threading.RLock | None = None,  # type: ignore[valid-type]
        extra_tensors: Sequence[torch.Tensor] = (),
        **averager_kwargs: Any,
    ):
        self.opt = opt
        self.extra_tensors = [t.detach() for t in extra_tensors]
        self.local_step = 0
        # what the owner wants newcomers to get with the state besides the step (hive's Trainer
        # puts the run's sample counts here); plain msgpack-able data
        self.run_metadata: dict[str, Any] = {}
        self.lock_parameters = lock_parameters or threading.RLock()
        initialize_optimizer_state(opt)
        self.average_parameters, self.average_gradients = average_parameters, average_gradients
        self.average_opt_statistics = tuple(average_opt_statistics)
        self._sources = self._find_sources()
        if not self._sources:
            raise ConfigError(
                "nothing to average: set average_parameters=True, average_gradients=True "
                "or name optimizer statistics in average_opt_statistics"
            )
        buffers = [torch.zeros(t.shape, dtype=torch.float32) for _, t in self._sources]
        self._snapshot = [torch.zeros_like(b) for b in buffers]
        super().__init__(buffers, dht, **averager_kwargs)

    def _find_sources(self) -> list[tuple[str, torch.Tensor]]:
        """(kind, parameter or statistic) for every averaged tensor, in a fixed order."""
        params = parameters_of(self.opt)
        sources: list[tuple[str, torch.Tensor]] = []
        if self.average_parameters:
            sources += [("param", p) for p in params]
        if self.average_gradients:
            sources += [("grad", p) for p in params]
        for name in self.average_opt_statistics:
            for p in params:
                state = self.opt.state.get(p, {})
                if not isinstance(state.get(name), torch.Tensor):
                    known = ", ".join(sorted(k for k, v in state.items() if isinstance(v, torch.Tensor))) or "none"
                    raise ConfigError(
                        f"average_opt_statistics names {name!r}, but {type(self.opt).__name__} keeps no such "
                        f"tensor per parameter; it has: {known}"
                    )
                sources.append(("stat", state[name]))
        return sources

    def refresh_sources(self) -> None:
        """Follow the optimizer's state after `load_state_dict` replaced its tensors."""
        with self.get_tensors():
            self._sources = self._find_sources()

    def _source_value(self, kind: str, tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor.grad if kind == "grad" else tensor

    # ---- one averaging round (called by the training thread) --------------------------------------

    def snapshot(self) -> bool:
        """Copy the sources into the averaged tensors and remember them. Call with
        `lock_parameters` held and no round in flight. Returns False, and the round must not
        start, if a value is not finite: a diverged peer must not spread NaN or inf to others."""
        with self.get_tensors() as averaged:
            for (kind, tensor), buffer, saved in zip(self._sources, averaged, self._snapshot, strict=True):
                value = self._source_value(kind, tensor)
                if value is None:
                    buffer.zero_()
                else:
                    buffer.copy_(value.detach())
                saved.copy_(buffer)
            return all_finite(averaged)

    def apply_delta(self) -> None:
        """Add `average - snapshot` to every source. Call with `lock_parameters` held."""
        with self.get_tensors() as averaged, torch.no_grad():
            for (kind, tensor), buffer, saved in zip(self._sources, averaged, self._snapshot, strict=True):
                delta = buffer - saved
                if kind == "grad":
                    if tensor.grad is None:
                        tensor.grad = torch.zeros_like(tensor)
                    tensor.grad.add_(delta.to(tensor.grad.device, tensor.grad.dtype))
                else:
                    tensor.add_(delta.to(tensor.device, tensor.dtype))

    # ---- state sharing ----------------------------------------------------------------------------

    def _state(self) -> tuple[list[torch.Tensor], list[list[Any]]]:
        """The shared state's tensors (parameters, extra tensors, optimizer tensors) and the
        optimizer's other entries."""
        opt_tensors, other = optimizer_state_tensors(self.opt)
        params = [p.detach() for p in parameters_of(self.opt)]
        return params + self.extra_tensors + [t.detach() for t in opt_tensors], other

    def _state_tensors(self) -> list[torch.Tensor]:
        return self._state()[0]

    def _state_lock(self) -> contextlib.AbstractContextManager[Any]:
        return self.lock_parameters

    def _state_template(self) -> Sequence[torch.Tensor]:
        return self._state_tensors()

    def get_current_state(self) -> StateSnapshot:
        """Raises HiveError (the downloader moves on to the next donor) if the state is not finite."""
        tensors, other = self._state()
        if not all_finite(tensors):
            raise HiveError("this peer's state is not finite (it diverged); it does not share it")
        return {"step": self.local_step, "optimizer_state": other, "run": self.run_metadata}, tensors

    def load_state_from_peers(  # type: ignore[override]
        self,
        wait: bool = True,
        timeout: float | None = None,
        progress: Any = None,
        validate: StateValidator | None = None,
        max_step: int | None = None,
    ) -> tuple[Any, list[torch.Tensor]] | None:
        """Download the run's parameters, optimizer state and step from the best donor, apply
        them to the model and optimizer, and return (metadata, tensors); None if nobody shares.

        A donor's metadata is checked strictly first (`check_state_metadata`, then the caller's
        `validate(metadata, tensors)` if given); a donor that fails is logged, banned for a while
        and the next one is tried. `max_step` bounds the step a donor may claim (default 2**62):
        pass the run's total steps, so that a donor claiming the run is over is refused.

        Raises:
            ConfigError: wait=False (the state is applied here), or max_step is not an int >= 0.
        """
        if not wait:
            raise ConfigError("TrainingAverager.load_state_from_peers applies the state; call it with wait=True")
        bound = MAX_STEP if max_step is None else max_step
        if not isinstance(bound, int) or isinstance(bound, bool) or bound < 0:
            raise ConfigError(f"max_step = {max_step!r} must be an integer >= 0 or None")

        # the local structure is read here, on the caller's thread, not on the DHT's during a step
        local = self._local_entries()

        def check(metadata: Any, tensors: list[torch.Tensor]) -> None:
            self.check_state_metadata(metadata, bound, local)
            if validate is not None:
                validate(metadata, tensors)

        loaded = super().load_state_from_peers(wait=True, timeout=timeout, progress=progress, validate=check)
        if loaded is None:
            return None
        metadata, tensors = loaded  # type: ignore[misc]
        with self.lock_parameters, torch.no_grad():
            for target, value in zip(self._state_tensors(), tensors, strict=True):
                target.copy_(value.to(target.device))
            params = parameters_of(self.opt)
            for index, key, value in metadata.get("optimizer_state", []):  # checked: known keys, same types
                self.opt.state[params[index]][key] = value
            self.local_step = metadata["step"]
        self.state_sharing_priority = self.local_step
        logger.debug("Loaded the run's state at step %d", self.local_step)
        return metadata, tensors

    def _local_entries(self) -> dict[tuple[int, str], Any]:
        """(parameter index, key) -> value of the local optimizer's non-tensor state entries."""
        return {(index, key): value for index, key, value in optimizer_state_tensors(self.opt)[1]}

    def check_state_metadata(
        self, metadata: Any, max_step: int = MAX_STEP, local: dict[tuple[int, str], Any] | None = None
    ) -> None:
        """Check a donor's metadata against this optimizer before any of it is applied.

        The step must be an int in [0, max_step]; "run" a dict if present; "optimizer_state" a
        list of [parameter index, key, value] whose (index, key) the local optimizer has as a
        non-tensor entry too, with a value of the same type (an int or a finite float for a
        float): a donor can neither add keys nor replace a tensor statistic by a number.
        The shapes and dtypes of the state's tensors are checked by the download itself.
        `local` is `_local_entries()`, read beforehand if the optimizer may be stepping.

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
        local = self._local_entries() if local is None else local
        for entry in entries:
            known = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
            if not (known and isinstance(entry[1], str) and (entry[0], entry[1]) in local):
                raise HiveError(f"its optimizer state entry {str(entry)[:60]} is not one this optimizer has")
            if not _same_kind(entry[2], local[entry[0], entry[1]]):
                raise HiveError(
                    f"its optimizer state entry {str(entry)[:60]} holds a {type(entry[2]).__name__} where this "
                    f"optimizer has a {type(local[entry[0], entry[1]]).__name__}"
                )


def _same_kind(value: Any, local: Any) -> bool:
    """A downloaded non-tensor optimizer entry may replace `local`: same type, and a finite number."""
    if isinstance(local, bool) or local is None:
        return type(value) is type(local)
    if isinstance(local, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(local, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str) and isinstance(local, str) and len(value) <= 1024
