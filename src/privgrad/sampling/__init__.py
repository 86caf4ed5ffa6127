"""Poisson sampling: index sampling in NumPy (``poisson``) and the DataLoader glue (``loader``)."""

from privgrad.sampling.poisson import PoissonSampler, numpy_bits, os_bits, steps_per_epoch

__all__ = ["PoissonSampler", "numpy_bits", "os_bits", "steps_per_epoch"]
