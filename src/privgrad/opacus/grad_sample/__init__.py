"""``opacus.grad_sample``: ``GradSampleModule`` and ``functorch.make_functional``."""

from privgrad.opacus.grad_sample import functorch
from privgrad.opacus.grad_sample.grad_sample_module import GradSampleModule

__all__ = ["GradSampleModule", "functorch"]
