"""Poisson sampling of record indices, in NumPy (no torch).

Each step includes each of the ``N`` records independently with probability ``q``. The Bernoulli
draws are exact comparisons of 64-bit random integers against ``floor(q * 2**64)``, so the
inclusion probability is ``q`` up to ``2**-64``, whatever the source of random bits.

The reproducible source derives step ``t``'s words from ``(seed, t)`` alone, so record ``i``'s
inclusion at step ``t`` does not depend on ``N``: a data set with one more record gives the same
batches plus that record wherever it is drawn (the coupling the add-one tests rely on), and a
resumed run needs only the seed and the step counter.

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

Bits = Callable[[int, int], np.ndarray]  # (n, step) -> n uniform 64-bit words


def numpy_bits(seed: int) -> Bits:
    """Reproducible words: step ``t`` uses PCG64 seeded with ``(seed, t)`` (not secure)."""
    def bits(n: int, step: int) -> np.ndarray:
        generator = np.random.default_rng([seed, step])
        return generator.bit_generator.random_raw(n).astype(np.uint64, copy=False)
    return bits


def os_bits(n: int, step: int = 0) -> np.ndarray:
    """Words from the operating system's CSPRNG (``os.urandom``); ``step`` is ignored."""
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
        bits: a source of uniform 64-bit words, ``bits(n, step) -> np.ndarray[uint64]``.

    Attributes:
        step: number of steps sampled so far (with the seed, the state a checkpoint needs).
            Iterating yields the steps left in the current epoch (see ``__len__``).
    """

    def __init__(self, num_records: int, sample_rate: float, *, bits: Bits, steps: int | None = None):
        self.num_records = _validate.positive_int(
            "num_records", num_records, "Poisson sampling needs a non-empty data set.")
        self.sample_rate = _validate.unit_interval_right_closed(
            "sample_rate", sample_rate, "Pass the per-step inclusion probability, e.g. 256 / N.")
        self.steps = steps_per_epoch(self.sample_rate) if steps is None else _validate.positive_int(
            "steps", steps, "Pass the number of steps per epoch, e.g. round(1 / sample_rate).")
        self.bits = bits
        self.step = 0
        self._threshold = np.uint64(min(int(Fraction(self.sample_rate) * 2**64), 2**64 - 1))
        self._all = self.sample_rate == 1.0

    def sample(self) -> np.ndarray:
        """One step's indices (sorted, int64)."""
        step, self.step = self.step, self.step + 1
        if self._all:
            return np.arange(self.num_records, dtype=np.int64)
        words = self.bits(self.num_records, step)
        return np.flatnonzero(words < self._threshold).astype(np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(len(self)):
            yield self.sample()

    def __len__(self) -> int:
        """Steps left in the current epoch: an epoch is a block of ``steps`` consecutive steps,
        so a run resumed (or broken off) mid-epoch finishes that epoch first, and epochs stay
        aligned with an uninterrupted run."""
        return self.steps - self.step % self.steps
