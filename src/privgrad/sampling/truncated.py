"""Truncated Poisson sampling with fixed shapes: ``make_private(..., max_batch_size=M)``.

Each step draws an ordinary Poisson sample; a sample larger than ``M`` is cut to ``M`` of its
records chosen uniformly at random (bits keyed by the step, so a resumed run cuts the same way),
and every batch is padded to exactly ``M`` rows with copies of record 0, listed after the real
rows. The engine learns from the loader how many rows of each batch are real and drops the
padding rows before anything is summed (``privgrad.engine.padding``): every batch has one shape,
which is what ``torch.compile``, CUDA graphs and static-shape accelerators need, and the largest
batch no longer sets the peak memory.

This module imports no torch.

Under a correlated-noise mechanism (``mechanism=BandMF(num_bands=b)``) the cut applies to
cyclic Poisson sampling the same way: step ``t`` draws group ``t mod b`` at rate ``p``, cut at
``M``. The groups are then drawn when the plan is made (``truncated_plan(..., group_key=)``),
because the accounting needs the largest group's size.

Privacy:
    Accounted as ``TruncatedPoissonGaussian`` (``privgrad.accounting.truncated``), which needs
    the data set's size ``N``; under cyclic sampling, one such event per round of the BandMF
    reduction with ``N`` the largest group's size plus one (the differing record's group in the
    larger of two neighbouring data sets is never larger; the truncated event's epsilon grows
    with ``N``, which a test checks). The reduction carries over: conditioned on the other
    records, a record's participation in a round is one truncated step of its group, and a
    record it displaces from that step belongs to the same step's column of the strategy. Padding rows are masked out of the clipped sum (their inputs and
    output gradients are zeroed, so even a non-finite padding row adds exactly nothing); the
    engine refuses a step whose rows it cannot match to the batch the loader yielded last,
    since with equal shapes only that tells real rows from padding.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from privgrad import _validate
from privgrad.sampling.cyclic import CyclicPoissonSampler
from privgrad.sampling.loader import DrawnBatches, poisson_loader
from privgrad.sampling.plan import SamplingPlan
from privgrad.sampling.poisson import PoissonSampler, numpy_bits, os_bits

__all__ = ["TruncatedCyclicSampler", "TruncatedPlan", "TruncatedSampler", "TruncationWarning",
           "truncated_plan"]

#: The share of sampled records that truncation may drop before the run warns.
WARN_SHARE = 0.01
#: Keys of the cut's bits: above every step number the Poisson draw uses.
_CUT_KEY = 2**61


class TruncationWarning(UserWarning):
    """Truncation drops a large share of the sampled records (a utility concern: the
    accounting covers it)."""


class _Cut:
    """Cuts each sample of the sampler it is mixed into at ``max_batch_size`` and pads it.

    Attributes:
        notes: the number of real rows of the batches sampled and not yet delivered.
        sampled, kept: records drawn by the sample and kept after the cut, so far.
    """

    def _start_cut(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.notes: deque[int] = deque()
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
        self.notes.append(len(indices))
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


class TruncatedSampler(_Cut, PoissonSampler):
    """Yields ``M`` indices per step: the Poisson sample cut to ``M``, then padding (record 0).
    ``PoissonSampler``'s arguments, plus ``max_batch_size``."""

    def __init__(self, num_records: int, sample_rate: float, max_batch_size: int, **kwargs):
        super().__init__(num_records, sample_rate, **kwargs)
        self._start_cut(max_batch_size)


class TruncatedCyclicSampler(_Cut, CyclicPoissonSampler):
    """Yields ``M`` indices per step: the cyclic Poisson sample of the step's group cut to
    ``M``, then padding (record 0). ``CyclicPoissonSampler``'s arguments, plus
    ``max_batch_size``."""

    def __init__(self, num_records: int, sample_rate: float, num_groups: int,
                 max_batch_size: int, **kwargs):
        super().__init__(num_records, sample_rate, num_groups, **kwargs)
        self._start_cut(max_batch_size)


class DrawnPadded(DrawnBatches):
    """``DrawnBatches`` whose note on each batch is how many of its rows are real
    (``real_rows(number)``; the rest are padding); a new pass abandons the batches no step
    released (a padded step must train on the latest batch only)."""

    LATEST_ONLY = True

    def real_rows(self, number: int) -> int | None:
        """Real rows of batch ``number`` (they come first), or ``None`` if unknown."""
        return self.note(number)


@dataclass(frozen=True)
class TruncatedPlan(SamplingPlan):
    """A [`SamplingPlan`][privgrad.sampling.plan.SamplingPlan] cut at ``max_batch_size`` and
    padded to it.

    Attributes:
        group_key: under cyclic sampling (``num_groups > 1``), the key of the groups, drawn when
            the plan was made (``None`` otherwise).
        event_size: the ``dataset_size`` of each step's truncated event: ``N``, or under cyclic
            sampling the largest group's size plus one.
    """

    max_batch_size: int = 1
    group_key: int | None = None
    event_size: int = 1

    def event(self, noise_multiplier: float):
        """The truncated Poisson-subsampled Gaussian step (of one group under cyclic
        sampling: one round of the BandMF reduction)."""
        from privgrad.accounting.events import TruncatedPoissonGaussian

        return TruncatedPoissonGaussian(noise_multiplier, self.sample_rate, self.event_size,
                                        self.max_batch_size)

    def rekeyed(self, group_key: int) -> TruncatedPlan:
        """This plan over ``group_key``'s groups (a resumed run's; the event follows them)."""
        if self.num_groups == 1:
            return self
        return replace(self, group_key=int(group_key),
                       event_size=largest_group(self.dataset_size, self.num_groups, group_key) + 1)

    def loader(self, data_loader, *, seed: int, secure: bool, ranks=None, group_key=None):
        """``(sampler, drawn, loader)``, every batch of ``max_batch_size`` rows (the plan's own
        groups under cyclic sampling; ``group_key`` is not used)."""
        if ranks is not None:
            raise _validate.fail(
                "max_batch_size runs in one process for now", "distributed", True,
                "Pass distributed=False, or drop max_batch_size.")
        bits = os_bits if secure else numpy_bits(seed)
        if self.num_groups > 1:
            sampler = TruncatedCyclicSampler(
                self.dataset_size, self.sample_rate, self.num_groups, self.max_batch_size,
                bits=bits, group_key=self.group_key, steps=self.steps_per_epoch)
        else:
            sampler = TruncatedSampler(self.dataset_size, self.sample_rate, self.max_batch_size,
                                       bits=bits, steps=self.steps_per_epoch)
        drawn = DrawnPadded(sampler)
        loader = poisson_loader(data_loader, sampler, drawn)
        loader.sampling = self
        return sampler, drawn, loader


def largest_group(num_records: int, num_groups: int, group_key: int) -> int:
    """The size of the largest of cyclic sampling's groups for ``group_key``."""
    sampler = CyclicPoissonSampler(num_records, 1.0, num_groups, bits=os_bits, group_key=group_key)
    return int(np.bincount(sampler.group_of(np.arange(num_records)), minlength=num_groups).max())


def truncated_plan(base: SamplingPlan, max_batch_size: object,
                   group_key: Callable[[], int] | None = None) -> TruncatedPlan:
    """``base`` cut at ``max_batch_size``; warns when the cut would drop more than
    ``WARN_SHARE`` of the sampled records on average (computed exactly; under cyclic sampling,
    for a group of average size). Cyclic sampling draws its groups now, from ``group_key()``."""
    from privgrad.accounting.truncated import expected_dropped_share

    m = _validate.positive_int("max_batch_size", max_batch_size,
                               "Pass the fixed batch size, a few standard deviations above the "
                               "expected batch size (e.g. q N + 4 sqrt(q N)).")
    if not base.poisson or base.dataset_size is None:
        raise _validate.fail(
            "max_batch_size needs privgrad's Poisson sampling over a data set with a length",
            "poisson_sampling", base.poisson, "Pass poisson_sampling=True and a map-style data "
            "set (the truncated event's accounting needs its size).")
    plan = TruncatedPlan(base.dataset_size, base.sample_rate, base.expected_batch_size, True,
                         base.num_groups, max_batch_size=m, event_size=base.dataset_size)
    if base.num_groups > 1:
        plan = plan.rekeyed(group_key())
    size = round(base.dataset_size / base.num_groups)  # (an average group's)
    share = expected_dropped_share(size, base.sample_rate, m)
    if share > WARN_SHARE:
        warnings.warn(
            f"max_batch_size={m} would drop {share:.1%} of the sampled records on average "
            f"(expected batch size {base.sample_rate * size:.1f}). The accounting "
            f"covers it, but the dropped records do not train and epsilon grows. Raise "
            f"max_batch_size to a few standard deviations above the expected batch size.",
            TruncationWarning, stacklevel=5)
    return plan
