"""Optimizers that average with other peers: wrap a torch optimizer, train as usual."""

from hivecli.optim.optimizer import DecentralizedOptimizer
from hivecli.optim.training_averager import TrainingAverager

__all__ = ["DecentralizedOptimizer", "TrainingAverager"]
