"""Optimizers that average with other peers: wrap a torch optimizer, train as usual.

- `DecentralizedOptimizer` (hivemind 0.9): step locally, average parameters in the background.
- `Optimizer` (hivemind 1.x): train toward a shared batch size; average gradients (or, with
  local updates, parameters) once per epoch.
- `DiLoCoOptimizer`: many local steps, then average pseudo-gradients and take an outer step.
"""

from hivecli.optim.collaborative import Optimizer
from hivecli.optim.diloco import DiLoCoOptimizer
from hivecli.optim.optimizer import DecentralizedOptimizer
from hivecli.optim.state import TrainingState
from hivecli.optim.tracker import ProgressTracker
from hivecli.optim.training_averager import TrainingAverager

__all__ = [
    "DecentralizedOptimizer",
    "DiLoCoOptimizer",
    "Optimizer",
    "ProgressTracker",
    "TrainingAverager",
    "TrainingState",
]
