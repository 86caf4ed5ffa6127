"""Poisson sampling of record indices, in NumPy (no torch).

Each step includes each of the ``N`` records independently with probability ``q``. The Bernoulli
draws are exact comparisons of 64-bit random integers against ``floor(q * 2**64)``, so the
inclusion probability is ``q`` up to ``2**-64``, whatever the source of random bits.

Privacy:
    The accountant's analysis of the subsampled Gaussian mechanism assumes exactly this:
    independent inclusion with probability ``q`` at every step, and fresh randomness per step.
    The number of steps per epoch is ``round(1 / q)``, a function of ``q`` alone, so when the
    caller fixes ``q`` nothing here depends on the data set's size except which indices exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from fractions import Fraction

import numpy as np

from privgrad import _validate

__all__ = ["PoissonSampler", "numpy_bits", "os_bits", "steps_per_epoch"]

Bits = Callable[[int], np.ndarray]


def numpy_bits(generator: np.random.Generator) -> Bits:
    """Random 64-bit words from a NumPy generator (reproducible, not secure)."""
    return lambda n: generator.bit_generator.random_raw(n).astype(np.uint64, copy=False)


def os_bits(n: int) -> np.ndarray:
    """Random 64-bit words from the operating system's CSPRNG (``os.urandom``)."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one epoch: ``round(1 / q)`` (at least 1)."""
    return max(1, round(1.0 / sample_rate))


class PoissonSampler:
    """Yields one index array per step, each record included with probability ``sample_rate``.

    Args:
        num_records: ``N``, the number of records indices are drawn from.
        sample_rate: ``q`` in ``(0, 1]``.
        steps: number of steps per pass over the sampler (default: ``round(1 / q)``).
        bits: a source of uniform 64-bit words, ``bits(n) -> np.ndarray[uint64]`` of length n.
    """

    def __init__(self, num_records: int, sample_rate: float, *, bits: Bits, steps: int | None = None):
        self.num_records = _validate.positive_int(
            "num_records", num_records, "Poisson sampling needs a non-empty data set.")
        self.sample_rate = _validate.unit_interval_right_closed(
            "sample_rate", sample_rate, "Pass the per-step inclusion probability, e.g. 256 / N.")
        self.steps = steps_per_epoch(self.sample_rate) if steps is None else _validate.positive_int(
            "steps", steps, "Pass the number of steps per epoch, e.g. round(1 / sample_rate).")
        self.bits = bits
        self._threshold = np.uint64(min(int(Fraction(self.sample_rate) * 2**64), 2**64 - 1))
        self._all = self.sample_rate == 1.0

    def sample(self) -> np.ndarray:
        """One step's indices (sorted, int64)."""
        if self._all:
            return np.arange(self.num_records, dtype=np.int64)
        return np.flatnonzero(self.bits(self.num_records) < self._threshold).astype(np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(self.steps):
            yield self.sample()

    def __len__(self) -> int:
        return self.steps
