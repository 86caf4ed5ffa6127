"""``opacus.optimizers``: the optimizers of hand-assembled DP-SGD (``DPOptimizer``,
``DistributedDPOptimizer``), and the view ``make_private`` returns (``PrivateOptimizer``)."""

from privgrad.opacus.optimizers.ddpoptimizer import DistributedDPOptimizer
from privgrad.opacus.optimizers.optimizer import DPOptimizer
from privgrad.opacus.optimizers.view import OptimizerView, PrivateOptimizer

__all__ = ["DPOptimizer", "DistributedDPOptimizer", "OptimizerView", "PrivateOptimizer"]
