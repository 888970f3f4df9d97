"""Learning-rate schedules: a linear warm-up, then constant, cosine or linear decay over the run.

The decay follows the *run's* progress (samples processed by all peers together, over the run's
goal), not this peer's steps: peers that average their parameters should use about the same
learning rate, whenever they joined. The warm-up counts this peer's step counter, which a peer
inherits from the run when it loads the run's state, so a late joiner does not warm up again.
No torch here: this is arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """The factor to multiply the base learning rate by.

    Args:
        kind: "constant", "cosine" or "linear".
        warmup_steps: the factor rises linearly from 0 to 1 over this many steps.
        final_fraction: cosine and linear decay end at this factor.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    final_fraction: float = 0.0

    def factor(self, step: int, run_fraction: float | None) -> float:
        """The factor at this peer's `step`, with the run `run_fraction` done (0..1; None: no goal)."""
        warmup = min(1.0, (max(0, step) + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "constant" or run_fraction is None:
            return warmup
        done = min(1.0, max(0.0, run_fraction))
        if self.kind == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * done))
        elif self.kind == "linear":
            decay = 1.0 - done
        else:
            raise ValueError(f"unknown schedule {self.kind!r}; use constant, cosine or linear")
        return warmup * (self.final_fraction + (1.0 - self.final_fraction) * decay)
