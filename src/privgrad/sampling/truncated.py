"""Truncated Poisson sampling with fixed shapes: ``make_private(..., max_batch_size=M)``.

Each step draws an ordinary Poisson sample; a sample larger than ``M`` is cut to ``M`` of its
records chosen uniformly at random (bits keyed by the step, so a resumed run cuts the same way),
and every batch is padded to exactly ``M`` rows with copies of record 0, listed after the real
rows. The engine learns from the loader how many rows of each batch are real and drops the
padding rows before anything is summed (``privgrad.engine.padding``): every batch has one shape,
which is what ``torch.compile``, CUDA graphs and static-shape accelerators need, and the largest
batch no longer sets the peak memory.

This module imports no torch.

Privacy:
    Accounted as ``TruncatedPoissonGaussian`` (``privgrad.accounting.truncated``), which needs
    the data set's size ``N``. Padding rows are masked out of the clipped sum (their inputs and
    output gradients are zeroed, so even a non-finite padding row adds exactly nothing); the
    engine refuses a step whose rows it cannot match to the batch the loader yielded last,
    since with equal shapes only that tells real rows from padding.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np

from privgrad import _validate
from privgrad.sampling.loader import DrawnBatches, poisson_loader
from privgrad.sampling.plan import SamplingPlan
from privgrad.sampling.poisson import Bits, PoissonSampler, numpy_bits, os_bits

__all__ = ["TruncatedPlan", "TruncatedSampler", "TruncationWarning", "truncated_plan"]

#: The share of sampled records that truncation may drop before the run warns.
WARN_SHARE = 0.01
#: Keys of the cut's bits: above every step number the Poisson draw uses.
_CUT_KEY = 2**61


class TruncationWarning(UserWarning):
    """Truncation drops a large share of the sampled records (a utility concern: the
    accounting covers it)."""


class TruncatedSampler(PoissonSampler):
    """Yields ``M`` indices per step: the Poisson sample cut to ``M``, then padding (record 0).

    Attributes:
        real: the number of real rows of the batches sampled and not yet delivered.
        sampled, kept: records drawn by the Poisson sample and kept after the cut, so far.
    """

    def __init__(self, num_records: int, sample_rate: float, max_batch_size: int, *,
                 bits: Bits, steps: int | None = None):
        super().__init__(num_records, sample_rate, bits=bits, steps=steps)
        self.max_batch_size = max_batch_size
        self.real: deque[int] = deque()
        self.sampled = self.kept = 0

    def sample(self) -> np.ndarray:
        step = self.step
        indices = super().sample()
        m = self.max_batch_size
        self.sampled += len(indices)
        if len(indices) > m:  # a uniformly random m of them
            words = self.bits(len(indices), _CUT_KEY + step)
            indices = np.sort(indices[np.argsort(words, kind="stable")[:m]])
        self.kept += len(indices)
        self.real.append(len(indices))
        return np.concatenate([indices, np.zeros(m - len(indices), dtype=np.int64)])

    def __iter__(self):
        yield from super().__iter__()
        dropped = 1.0 - self.kept / self.sampled if self.sampled else 0.0
        if dropped > WARN_SHARE:
            warnings.warn(
                f"max_batch_size={self.max_batch_size} dropped {dropped:.1%} of the sampled "
                f"records so far (measured). The accounting covers it, but the dropped records "
                f"do not train. Raise max_batch_size to a few standard deviations above the "
                f"expected batch size.", TruncationWarning, stacklevel=2)


class DrawnPadded(DrawnBatches):
    """``DrawnBatches`` that also records how many rows
    of each batch yielded are real (``real_rows(number)``; the rest are padding)."""

    def __init__(self, sampler: TruncatedSampler):
        super().__init__()
        self.sampler = sampler
        self._queued_real: deque[int] = deque()
        self._real: dict[int, int] = {}

    def queue(self, size: int, step: int | None = None) -> None:
        super().queue(size, step)
        self._queued_real.append(self.sampler.real.popleft())

    def restart(self) -> None:
        """A new pass over the loader: batches of the last pass that no step released are
        abandoned (a padded step must train on the latest batch only)."""
        super().restart()
        self._pending.clear()
        self._queued_real.clear()
        self.sampler.real.clear()

    def deliver(self) -> None:
        super().deliver()
        self._real[self.delivered] = self._queued_real.popleft()
        self._real.pop(self.delivered - self.KEEP, None)

    def real_rows(self, number: int) -> int | None:
        """Real rows of batch ``number`` (they come first), or ``None`` if unknown."""
        return self._real.get(number)


@dataclass(frozen=True)
class TruncatedPlan(SamplingPlan):
    """A [`SamplingPlan`][privgrad.sampling.plan.SamplingPlan] cut at ``max_batch_size`` and
    padded to it."""

    max_batch_size: int = 1

    def event(self, noise_multiplier: float):
        """The truncated Poisson-subsampled Gaussian step."""
        from privgrad.accounting.events import TruncatedPoissonGaussian

        return TruncatedPoissonGaussian(noise_multiplier, self.sample_rate, self.dataset_size,
                                        self.max_batch_size)

    def loader(self, data_loader, *, seed: int, secure: bool, ranks=None, group_key=None):
        """``(sampler, drawn, loader)``, every batch of ``max_batch_size`` rows."""
        if ranks is not None:
            raise _validate.fail(
                "max_batch_size runs in one process for now", "distributed", True,
                "Pass distributed=False, or drop max_batch_size.")
        sampler = TruncatedSampler(self.dataset_size, self.sample_rate, self.max_batch_size,
                                   bits=os_bits if secure else numpy_bits(seed),
                                   steps=self.steps_per_epoch)
        drawn = DrawnPadded(sampler)
        loader = poisson_loader(data_loader, sampler, drawn)
        loader.sampling = self
        return sampler, drawn, loader


def truncated_plan(base: SamplingPlan, max_batch_size: object) -> TruncatedPlan:
    """``base`` cut at ``max_batch_size``; warns when the cut would drop more than
    ``WARN_SHARE`` of the sampled records on average (computed exactly)."""
    from privgrad.accounting.truncated import expected_dropped_share

    m = _validate.positive_int("max_batch_size", max_batch_size,
                               "Pass the fixed batch size, a few standard deviations above the "
                               "expected batch size (e.g. q N + 4 sqrt(q N)).")
    if not base.poisson or base.dataset_size is None:
        raise _validate.fail(
            "max_batch_size needs privgrad's Poisson sampling over a data set with a length",
            "poisson_sampling", base.poisson, "Pass poisson_sampling=True and a map-style data "
            "set (the truncated event's accounting needs its size).")
    share = expected_dropped_share(base.dataset_size, base.sample_rate, m)
    if share > WARN_SHARE:
        warnings.warn(
            f"max_batch_size={m} would drop {share:.1%} of the sampled records on average "
            f"(expected batch size {base.sample_rate * base.dataset_size:.1f}). The accounting "
            f"covers it, but the dropped records do not train and epsilon grows. Raise "
            f"max_batch_size to a few standard deviations above the expected batch size.",
            TruncationWarning, stacklevel=5)
    return TruncatedPlan(base.dataset_size, base.sample_rate, base.expected_batch_size, True,
                         max_batch_size=m)
