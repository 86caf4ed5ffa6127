"""Cyclic Poisson sampling of record indices, in NumPy (no torch): the batch selection of the
correlated-noise mechanisms (amplified BandMF, BLT).

The ``N`` records are split into ``b`` groups: record ``i`` belongs to group ``g(i)``, drawn once,
independently and (up to ``2**-32``) uniformly over ``0 .. b - 1`` for every index, from a secret
key (``group_key``). Step ``t`` samples group ``t mod b`` only, each of its records independently
with probability ``p`` (the sampler's ``sample_rate``). A record therefore takes part in at most
one of any ``b`` consecutive steps, the participation pattern that a ``b``-banded strategy's
sensitivity and the amplified accounting (``privgrad.mechanisms.amplified_event``: DP-SGD with
``ceil(n / b)`` rounds at rate ``p``) assume. With ``b = 1`` this is Poisson sampling, word for
word: [`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler]'s draws for the same seed.

Which record gets which random word: record ``i`` takes word ``i`` of step ``t``'s words,
``bits(N, t)[i]``, and is drawn when it is in the step's group and its word is below
``p * 2**64``. Its inclusion at step ``t`` then depends on ``(seed, key, t, i)`` alone, never on
``N`` (the add-one coupling: a data set with one more record gives the same batches plus that
record wherever it is drawn).

Why a keyed random group per index and not ``i mod b``: with a fixed partition, inserting or
deleting a record in the middle of the data set moves every later record to another group, so
the guarantee would hold only for neighbours that keep every other record's index (a record
appended, or zeroed out). With groups and inclusion words drawn independently for every index
from secret randomness, the sampler's output distribution does not depend on the order of the
data set (the records' assignments are exchangeable), so a record added or removed anywhere
gives the same distribution as one added or removed at the end: add/remove adjacency, as for
plain Poisson sampling. Given any fixed assignment the amplified analysis holds (the record's
group fixes its steps), and a data-independent mixture of mechanisms that are each
(epsilon, delta)-DP is (epsilon, delta)-DP. The key survives a resume in the engine's state (also
in secure mode, where it comes from the operating system): a key drawn afresh would let a record
take part twice within ``b`` steps across the resume.

Privacy:
    Each step is a Poisson sample of one group (independent inclusion with probability ``p``,
    fresh words per step, exact to ``2**-64``); a record's group is fixed by the key and its
    index, before training and independently of the records' content. The key must stay as
    secret as the sampling seed: whoever knows it and the data set's order knows which steps a
    record can take part in (the guarantee still holds for each fixed assignment, but the
    add/remove argument above uses its secrecy). Group sizes are Binomial(``N``, ``1 / b``),
    not equal.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

from privgrad import _validate
from privgrad.errors import ConfigTypeError
from privgrad.sampling.poisson import Bits, steps_per_epoch

__all__ = ["CyclicPoissonSampler", "cyclic_steps_per_epoch", "group_words"]

_GROUPS_FIX = ("Pass the number of groups b >= 1 (the mechanism's num_bands; b = 1 is plain "
               "Poisson sampling), e.g. num_groups=16.")
_TAG = 0x67726F757073  # "groups": keeps the key's stream apart from any other use of the key


def cyclic_steps_per_epoch(sample_rate: float, num_groups: int) -> int:
    """Steps in one epoch of cyclic sampling: ``round(b / p)``, Poisson sampling's
    ``round(1 / q)`` for the overall rate ``q = p / b``.

    Each group is visited about ``1 / p`` times, so each record is expected to take part about
    once per epoch, as under Poisson sampling at the same expected batch size. (A multiple of
    ``b``, ``b * round(1 / p)``, would start every epoch at group 0 but, with ``p`` near 1/2 or
    above, cut a quarter of the passes over the data: ``round(1 / 0.41) = 2`` visits make
    0.82 expected participations.) The group of step ``t`` is ``t mod b`` across epochs.
    """
    return steps_per_epoch(sample_rate / num_groups)


def group_words(group_key: int, n: int) -> np.ndarray:
    """The first ``n`` words of the key's group stream (uint64; a prefix of any longer call, so
    record ``i``'s word does not depend on ``N``)."""
    stream = np.random.default_rng([int(group_key) % 2**64, _TAG]).bit_generator
    return stream.random_raw(n).astype(np.uint64, copy=False)


def _num_groups(value: object, num_records: int) -> int:
    """``num_groups`` as int in ``[1, num_records]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) and not (
            isinstance(value, numbers.Real) and float(value).is_integer()):
        raise ConfigTypeError(
            f"num_groups must be an integer; got num_groups={value!r}. {_GROUPS_FIX}")
    b = int(value)
    if b < 1:
        raise _validate.fail("num_groups must be >= 1", "num_groups", value, _GROUPS_FIX)
    if b > num_records:
        raise _validate.fail(
            f"num_groups must be <= num_records ({num_records}): a group is expected to hold "
            "a record", "num_groups", value,
            f"Pass num_groups <= {num_records}, or train on more records.")
    return b


class CyclicPoissonSampler:
    """Yields one index array per step: step ``t`` draws each record of group ``t mod b``
    with probability ``sample_rate``.

    The same interface as [`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler]
    (``sample()``, iteration over the rest of the epoch, ``len``, the ``step`` counter and the
    ``bits`` source that a checkpoint restores), plus the partition (``group_of``, ``members``,
    ``group_key``).

    Args:
        num_records: ``N``, the number of records indices are drawn from.
        sample_rate: ``p`` in ``(0, 1]``: the inclusion probability of a record of the step's
            group (with expected batch size ``B``: ``p = B b / N``).
        num_groups: ``b`` in ``[1, N]``, the number of groups (BandMF: its number of bands).
        bits: a source of uniform 64-bit words, ``bits(n, step) -> np.ndarray[uint64]``
            (``numpy_bits(seed)``, or ``os_bits`` in secure mode).
        group_key: the secret integer the groups are drawn from (see the module docstring).
        steps: number of steps per pass over the sampler (default: ``round(b / p)``, an
            epoch in which each record is expected to take part about once).

    Attributes:
        step: number of steps sampled so far (with the seed and the key, the state a checkpoint
            needs). Iterating yields the steps left in the current epoch.

    Privacy:
        See the module docstring: a record takes part in at most one of any ``b`` consecutive
        steps, and each step is a Poisson sample of its group at rate ``p``.
    """

    def __init__(self, num_records: int, sample_rate: float, num_groups: int, *, bits: Bits,
                 group_key: int, steps: int | None = None):
        self.num_records = _validate.positive_int(
            "num_records", num_records, "Cyclic Poisson sampling needs a non-empty data set.")
        self.sample_rate = _validate.unit_interval_right_closed(
            "sample_rate", sample_rate,
            "Pass the inclusion probability within the step's group, e.g. B * num_groups / N.")
        self.num_groups = _num_groups(num_groups, self.num_records)
        if isinstance(group_key, bool) or not isinstance(group_key, numbers.Integral):
            raise ConfigTypeError(
                f"group_key must be an integer; got group_key={group_key!r}. Pass a secret "
                "random integer (the engine draws one at make_private).")
        self.group_key = int(group_key)
        self.steps = (cyclic_steps_per_epoch(self.sample_rate, self.num_groups) if steps is None
                      else _validate.positive_int(
                          "steps", steps,
                          "Pass the number of steps per epoch, e.g. round(num_groups / sample_rate)."))
        self.bits = bits
        self.step = 0
        self._threshold = np.uint64(min(int(Fraction(self.sample_rate) * 2**64), 2**64 - 1))
        self._all = self.sample_rate == 1.0
        self._groups = self._assign(self.num_records)

    def rekey(self, group_key: int) -> None:
        """Take another key's groups (a resumed run continues the saved run's partition)."""
        self.group_key = int(group_key)
        self._groups = self._assign(self.num_records)

    def _assign(self, n: int) -> np.ndarray:
        """Groups of indices ``0 .. n - 1`` (int64): the top 32 bits of each word scaled to
        ``b`` (bias below ``2**-32``; the argument needs independence, not exact uniformity)."""
        if self.num_groups == 1:
            return np.zeros(n, dtype=np.int64)
        top = group_words(self.group_key, n) >> np.uint64(32)
        return ((top * np.uint64(self.num_groups)) >> np.uint64(32)).astype(np.int64)

    def group_of(self, indices) -> np.ndarray:
        """The group of each record index (int64; independent of ``N``)."""
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise ConfigTypeError(
                f"indices must be integers; got indices of dtype {idx.dtype}. Pass record "
                f"indices, e.g. np.arange(N).")
        if not idx.size:
            return np.zeros(0, dtype=np.int64)
        if idx.min() < 0:
            raise _validate.fail("indices must be >= 0", "min(indices)", int(idx.min()),
                                 "Pass record indices in [0, N).")
        top = int(idx.max()) + 1
        groups = self._groups if top <= len(self._groups) else self._assign(top)
        return groups[idx.astype(np.int64)]

    def members(self, group: int) -> np.ndarray:
        """The record indices of ``group`` (sorted, int64)."""
        g = _validate.nonnegative_int("group", group, f"Pass a group in [0, {self.num_groups}).")
        if g >= self.num_groups:
            raise _validate.fail(f"group must be < num_groups ({self.num_groups})", "group", group,
                                 f"Pass a group in [0, {self.num_groups}).")
        return np.flatnonzero(self._groups == g).astype(np.int64)

    def sample(self) -> np.ndarray:
        """One step's indices (sorted, int64): a Poisson sample of group ``step mod b``."""
        step, self.step = self.step, self.step + 1
        group = step % self.num_groups
        in_group = self._groups == group
        if self._all:
            return np.flatnonzero(in_group).astype(np.int64)
        words = self.bits(self.num_records, step)
        return np.flatnonzero(in_group & (words < self._threshold)).astype(np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(len(self)):
            yield self.sample()

    def __len__(self) -> int:
        """Steps left in the current epoch (epochs are blocks of ``steps`` consecutive steps,
        aligned with an uninterrupted run, as for ``PoissonSampler``)."""
        return self.steps - self.step % self.steps
