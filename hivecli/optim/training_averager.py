"""`TrainingAverager`: a `DecentralizedAverager` over a model's parameters and optimizer state.

The averaged tensors are float32 CPU copies of the chosen *sources* (parameters, gradients,
named optimizer statistics), so models may live on any device and in any dtype. A round goes:
`snapshot()` copies the sources in and remembers them, `step()` averages the copies with the
group, and `apply_delta()` adds `average - snapshot` to each source: local updates made while
the round was in flight are kept (the delta rule).

Its shared state is a `TrainingState` (hivecli.optim.state): the whole training state, which
also owns the step counter.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from hivecli._exceptions import ConfigError
from hivecli.averaging.averager import DecentralizedAverager, StateValidator
from hivecli.dht.dht import DHT
from hivecli.optim.state import (
    MAX_STEP,
    TrainingState,
    all_finite,
    initialize_optimizer_state,
    load_training_state,
    optimizer_state_tensors,
    parameters_of,
)

__all__ = [
    "MAX_STEP",
    "TrainingAverager",
    "all_finite",
    "initialize_optimizer_state",
    "optimizer_state_tensors",
    "parameters_of",
]


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
        state: the `TrainingState` to share (default: one over `opt`, `extra_tensors` and
            `lock_parameters`); pass the optimizer's own so that one object owns the step.
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
        state: TrainingState | None = None,
        **averager_kwargs: Any,
    ):
        self.opt = opt
        self.state = state or TrainingState(opt, extra_tensors, lock_parameters)
        self.lock_parameters = self.state.lock
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
        super().__init__(buffers, dht, shared_state=self.state.shared(), **averager_kwargs)

    @property
    def local_step(self) -> int:
        """The shared state's step counter (its one owner is `self.state`)."""
        return self.state.step

    @local_step.setter
    def local_step(self, value: int) -> None:
        self.state.step = value

    @property
    def run_metadata(self) -> dict[str, Any]:
        return self.state.run_metadata

    @run_metadata.setter
    def run_metadata(self, value: dict[str, Any]) -> None:
        self.state.run_metadata = value

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
        See `hivecli.optim.state.load_training_state`.

        Raises:
            ConfigError: wait=False (the state is applied here), or max_step is not an int >= 0.
        """
        if not wait:
            raise ConfigError("TrainingAverager.load_state_from_peers applies the state; call it with wait=True")
        return load_training_state(self, self.state, timeout, progress, validate, max_step)

    def check_state_metadata(
        self, metadata: Any, max_step: int = MAX_STEP, local: dict[tuple[int, str], Any] | None = None
    ) -> None:
        """See `TrainingState.check_state_metadata`."""
        self.state.check_state_metadata(metadata, max_step, local)
