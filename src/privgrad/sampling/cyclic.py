"""Cyclic Poisson sampling of record indices, in NumPy (no torch): the batch selection of
amplified banded matrix factorization (BandMF).

The ``N`` records are split into ``b`` fixed groups: record ``i`` belongs to group ``i mod b``.
Step ``t`` samples group ``t mod b`` only, each of its records independently with probability
``p`` (the sampler's ``sample_rate``). A record therefore takes part in at most one of any ``b``
consecutive steps, the participation pattern that a ``b``-banded strategy's sensitivity and the
amplified accounting (``privgrad.mechanisms.amplified_event``: DP-SGD with ``ceil(n / b)``
rounds at rate ``p``) assume. With ``b = 1`` this is Poisson sampling, word for word:
[`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler]'s draws for the same seed.

Which record gets which random word: record ``i = g + j b`` of group ``g`` takes word ``j`` of
step ``t``'s words, ``bits(size of group g, t)[j]``. Its inclusion at step ``t`` then depends on
``(seed, t, i)`` alone, never on ``N`` (the add-one coupling: a data set with one more record
gives the same batches plus that record wherever it is drawn), a step draws only the ``N / b``
words it uses, and ``b = 1`` draws exactly Poisson sampling's words.

Why ``i mod b`` and not a pseudo-random partition from the seed: the group of record ``i`` must
not depend on ``N`` (a permutation of ``range(N)`` does, so one more record would move every
other record to another group and break the add-one coupling), and it must survive a resume
exactly: ``i mod b`` needs no state at all, also in secure mode, where there is no seed to
re-derive a partition from (a partition drawn afresh on resume would let a record take part
twice within ``b`` steps across the resume, breaking the strategy's sensitivity). It also keeps
the groups' sizes within one of each other, and spreads a data set sorted by label evenly over
the groups (contiguous blocks would give each group a few labels).

Privacy:
    Each step is a Poisson sample of one fixed group (independent inclusion with probability
    ``p``, fresh words per step, exact to ``2**-64``), and a record's group is fixed by its
    index alone, before training and independently of the records' content. The guarantee is
    for neighbouring data sets that differ in one record while every other record keeps its
    index: a record appended (or removed from the end), or a record replaced by an empty slot
    that contributes nothing (zero-out adjacency, under which the banded strategies'
    multi-participation sensitivity is stated in the literature). For this mechanism the
    zero-out privacy loss equals the add/remove one of the Poisson-subsampled Gaussian, so the
    accountant's events apply unchanged. What it does not cover, unlike plain Poisson sampling
    (whose draws are exchangeable): inserting or deleting a record in the *middle* of the data
    set, which moves every later record to another group. The order of the data set must
    therefore be fixed independently of whether any one record is present (an append-only
    order, or a removed record's slot kept).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

from privgrad import _validate
from privgrad.errors import ConfigTypeError
from privgrad.sampling.poisson import Bits, steps_per_epoch

__all__ = ["CyclicPoissonSampler", "cyclic_steps_per_epoch"]

_BANDS_FIX = ("Pass the number of groups b >= 1, the mechanism's num_bands (b = 1 is plain "
              "Poisson sampling), e.g. num_bands=16.")


def cyclic_steps_per_epoch(sample_rate: float, num_bands: int) -> int:
    """Steps in one epoch of cyclic sampling: ``b * round(1 / p)``.

    Each group is visited ``round(1 / p)`` times, so each record is expected to take part
    ``p * round(1 / p)`` (about one) times per epoch, and every epoch starts at group 0.
    """
    return num_bands * steps_per_epoch(sample_rate)


def _num_bands(value: object, num_records: int) -> int:
    """``num_bands`` as int in ``[1, num_records]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) and not (
            isinstance(value, numbers.Real) and float(value).is_integer()):
        raise ConfigTypeError(f"num_bands must be an integer; got num_bands={value!r}. {_BANDS_FIX}")
    b = int(value)
    if b < 1:
        raise _validate.fail("num_bands must be >= 1", "num_bands", value, _BANDS_FIX)
    if b > num_records:
        raise _validate.fail(
            f"num_bands must be <= num_records ({num_records}): every group needs a record",
            "num_bands", value,
            f"Pass num_bands <= {num_records}, or train on more records.")
    return b


class CyclicPoissonSampler:
    """Yields one index array per step: step ``t`` draws each record of group ``t mod b``
    (the records ``i`` with ``i mod b == t mod b``) with probability ``sample_rate``.

    The same interface as [`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler]
    (``sample()``, iteration over the rest of the epoch, ``len``, the ``step`` counter and the
    ``bits`` source that a checkpoint restores), plus the partition (``group_of``, ``members``).

    Args:
        num_records: ``N``, the number of records indices are drawn from.
        sample_rate: ``p`` in ``(0, 1]``: the inclusion probability of a record of the step's
            group (with expected batch size ``B``: ``p = B b / N``).
        num_bands: ``b`` in ``[1, N]``, the number of groups (the strategy's number of bands).
        bits: a source of uniform 64-bit words, ``bits(n, step) -> np.ndarray[uint64]``
            (``numpy_bits(seed)``, or ``os_bits`` in secure mode).
        steps: number of steps per pass over the sampler (default: ``b * round(1 / p)``, an
            epoch in which each record is expected to take part about once; a multiple of
            ``b`` keeps every epoch starting at group 0 and visiting each group equally often).

    Attributes:
        step: number of steps sampled so far (with the seed, the state a checkpoint needs; the
            partition needs none). Iterating yields the steps left in the current epoch.

    Privacy:
        See the module docstring: a record takes part in at most one of any ``b`` consecutive
        steps, and each step is a Poisson sample of its group at rate ``p``; neighbouring data
        sets differ in one record while the others keep their indices.
    """

    def __init__(self, num_records: int, sample_rate: float, num_bands: int, *, bits: Bits,
                 steps: int | None = None):
        self.num_records = _validate.positive_int(
            "num_records", num_records, "Cyclic Poisson sampling needs a non-empty data set.")
        self.sample_rate = _validate.unit_interval_right_closed(
            "sample_rate", sample_rate,
            "Pass the inclusion probability within the step's group, e.g. B * num_bands / N.")
        self.num_bands = _num_bands(num_bands, self.num_records)
        self.steps = (cyclic_steps_per_epoch(self.sample_rate, self.num_bands) if steps is None
                      else _validate.positive_int(
                          "steps", steps,
                          "Pass the number of steps per epoch, e.g. num_bands * round(1 / sample_rate)."))
        self.bits = bits
        self.step = 0
        self._threshold = np.uint64(min(int(Fraction(self.sample_rate) * 2**64), 2**64 - 1))
        self._all = self.sample_rate == 1.0

    def group_of(self, indices) -> np.ndarray:
        """The group of each record index (``index mod b``, int64; independent of ``N``)."""
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise ConfigTypeError(
                f"indices must be integers; got indices of dtype {idx.dtype}. Pass record "
                f"indices, e.g. np.arange(N).")
        if idx.size and idx.min() < 0:
            raise _validate.fail("indices must be >= 0", "min(indices)", int(idx.min()),
                                 "Pass record indices in [0, N).")
        return idx.astype(np.int64) % self.num_bands

    def members(self, group: int) -> np.ndarray:
        """The record indices of ``group`` (``group, group + b, ...`` below ``N``; int64)."""
        g = _validate.nonnegative_int("group", group, f"Pass a group in [0, {self.num_bands}).")
        if g >= self.num_bands:
            raise _validate.fail(f"group must be < num_bands ({self.num_bands})", "group", group,
                                 f"Pass a group in [0, {self.num_bands}).")
        return np.arange(g, self.num_records, self.num_bands, dtype=np.int64)

    def sample(self) -> np.ndarray:
        """One step's indices (sorted, int64): a Poisson sample of group ``step mod b``."""
        step, self.step = self.step, self.step + 1
        group = step % self.num_bands
        if self._all:
            return self.members(group)
        size = (self.num_records - group + self.num_bands - 1) // self.num_bands
        words = self.bits(size, step)
        return group + self.num_bands * np.flatnonzero(words < self._threshold).astype(np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(len(self)):
            yield self.sample()

    def __len__(self) -> int:
        """Steps left in the current epoch (epochs are blocks of ``steps`` consecutive steps,
        aligned with an uninterrupted run, as for ``PoissonSampler``)."""
        return self.steps - self.step % self.steps
