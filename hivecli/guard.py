"""The divergence guard: tells a training loop when its model has gone bad.

A step is bad when its loss is not finite, or when the smoothed loss climbs far above its
recent level (the run is diverging even if every number is still finite). The guard only
judges; the training loop rolls back (hivecli.training). Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median


@dataclass(frozen=True)
class GuardSettings:
    """How far is too far. The smoothed loss is an exponential moving average over about
    `1 / smoothing` steps; its recent level is the median of its last `window` values. A
    step is bad when the smoothed loss exceeds `factor` times that level plus `margin` (the
    margin keeps a well-trained model, whose loss is near 0, from tripping on one hard batch).
    """

    smoothing: float = 0.2
    window: int = 200
    warmup: int = 1  # steps to observe before judging spikes (non-finite losses are always bad)
    factor: float = 3.0
    margin: float = 1.0


class DivergenceGuard:
    def __init__(self, settings: GuardSettings | None = None):
        self.settings = settings or GuardSettings()
        self.smoothed: float | None = None
        self._history: deque[float] = deque(maxlen=self.settings.window)

    def check(self, loss: float) -> str | None:
        """Observe one step's loss. Returns None if the step is fine, else why it is not
        (one phrase, e.g. "loss nan is not finite"); a bad loss is not added to the history."""
        if not math.isfinite(loss):
            return f"loss {loss} is not finite"
        s = self.settings
        smoothed = loss if self.smoothed is None else (1 - s.smoothing) * self.smoothed + s.smoothing * loss
        if len(self._history) >= s.warmup:
            level = median(self._history)
            if smoothed > s.factor * level + s.margin:
                return f"loss {smoothed:.3g} (smoothed) is far above its recent level {level:.3g}"
        self.smoothed = smoothed
        self._history.append(smoothed)
        return None

    def reset(self) -> None:
        """Forget the history (after a rollback, the loss starts from another level)."""
        self.smoothed = None
        self._history.clear()
