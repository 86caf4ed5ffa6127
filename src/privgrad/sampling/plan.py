"""One place resolves how a run samples: the data set's size, ``q``, the expected batch size,
the steps per epoch, the Poisson loader, and the privacy event each step is.

[`plan()`][privgrad.sampling.plan.plan] validates the loader and the sampling arguments once
(``make_private`` and ``make_private_with_epsilon`` call it once, and the latter hands its plan to
the former); [`SamplingPlan.loader()`][privgrad.sampling.plan.SamplingPlan.loader] builds the
Poisson sampler and loader; [`SamplingPlan.event()`][privgrad.sampling.plan.SamplingPlan.event] is
what the accountant records for one step, derived from the sampling itself (as jax_privacy derives
its event from its batch-selection strategy), so that a sampler of another kind brings its own
event.

Privacy:
    With ``sample_rate`` and ``expected_batch_size`` given, nothing here depends on the data
    set's size except which indices exist (its size is then treated as private); otherwise the
    size is public and sets ``q = batch_size / N``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DataLoader

from privgrad import _validate
from privgrad.errors import ConfigError
from privgrad.sampling.cyclic import CyclicPoissonSampler, cyclic_steps_per_epoch
from privgrad.sampling.loader import DrawnBatches, PoissonLoader, check_loader, poisson_loader
from privgrad.sampling.poisson import PoissonSampler, numpy_bits, os_bits

__all__ = ["SamplingPlan", "plan", "sampling_rate"]


@dataclass(frozen=True)
class SamplingPlan:
    """How a run samples (validated).

    Attributes:
        dataset_size: ``N`` (``None`` for a data set without a length when nothing needs it).
        sample_rate: the inclusion probability of a record at a step that samples it: ``q``
            (``B / N`` or the declared one), times ``num_groups`` under cyclic sampling.
        expected_batch_size: ``q N`` or the declared one: the normaliser of a mean loss.
        poisson: whether privgrad's Poisson loader replaces the loader's sampling.
        num_groups: ``b``: 1 for Poisson sampling; more for cyclic Poisson sampling
            ([`CyclicPoissonSampler`][privgrad.sampling.cyclic.CyclicPoissonSampler]), which the
            correlated-noise mechanisms need (step ``t`` samples group ``t mod b``).
    """

    dataset_size: int | None
    sample_rate: float
    expected_batch_size: float
    poisson: bool
    num_groups: int = 1

    @property
    def base_rate(self) -> float:
        """``q``: the share of the data set an average step draws (``sample_rate`` over the
        groups)."""
        return self.sample_rate / self.num_groups

    #: what one unit of privacy is: an example (a user: ``privgrad.sampling.users``)
    privacy_unit = "example"

    @property
    def units(self) -> int | None:
        """The number of privacy units ``q`` is over: here the examples."""
        return self.dataset_size

    @property
    def steps_per_epoch(self) -> int:
        return cyclic_steps_per_epoch(self.sample_rate, self.num_groups)

    def event(self, noise_multiplier: float):
        """The privacy event of one step (of one round, under cyclic sampling): the
        Poisson-subsampled Gaussian mechanism."""
        from privgrad.accounting.events import PoissonGaussian  # (accounting is imported lazily)

        return PoissonGaussian(noise_multiplier, self.sample_rate)

    def loader(self, data_loader: DataLoader, *, seed: int, secure: bool, ranks=None,
               group_key: int | None = None):
        """``(sampler, drawn, loader)``: the Poisson sampler (``bits`` from ``seed``, or the OS
        in secure mode; cyclic over ``group_key``'s groups when ``num_groups > 1``), the record
        of what the loader yields, and the loader itself (for data-parallel ``ranks``, over this
        rank's share of each sample)."""
        bits = os_bits if secure else numpy_bits(seed)
        if self.num_groups > 1:
            sampler = CyclicPoissonSampler(self.dataset_size, self.sample_rate, self.num_groups,
                                           bits=bits, group_key=group_key,
                                           steps=self.steps_per_epoch)
        else:
            sampler = PoissonSampler(self.dataset_size, self.sample_rate, bits=bits,
                                     steps=self.steps_per_epoch)
        drawn = DrawnBatches()
        shard = ranks.shard(sampler) if ranks is not None else sampler
        loader = poisson_loader(data_loader, shard, drawn)
        loader.sampling = self
        return sampler, drawn, loader


def plan(data_loader: DataLoader, *, poisson_sampling: bool = True, sample_rate=None,
         expected_batch_size=None, loss_reduction: str = "mean",
         num_groups: int = 1) -> SamplingPlan:
    """Validate the loader and the sampling arguments once; see the module docstring. A loader
    privgrad returned before (a second run on the same data) keeps its data set's size, ``q``
    and expected batch size unless ``sample_rate`` and ``expected_batch_size`` are given.
    ``num_groups > 1`` plans cyclic Poisson sampling at ``q * num_groups`` within each group."""
    check_loader(data_loader, poisson_sampling)
    earlier = getattr(data_loader, "sampling", None)
    if isinstance(data_loader, PoissonLoader) and earlier is not None and None in (
            sample_rate, expected_batch_size):
        sample_rate, expected_batch_size = earlier.base_rate, earlier.expected_batch_size
    n = _dataset_size(data_loader, poisson_sampling, sample_rate, expected_batch_size)
    q, expected = sampling_rate(data_loader, n, sample_rate, expected_batch_size,
                                loss_reduction, poisson_sampling)
    if num_groups > 1:
        q = group_rate(q, num_groups, n)
    return SamplingPlan(n, q, expected, poisson_sampling, num_groups)


def group_rate(q: float, num_groups: int, n: int | None) -> float:
    """``p = q b``: cyclic sampling draws each step from one of ``b`` groups, so a record of
    the step's group is drawn with ``b`` times the rate that keeps the expected batch size."""
    p = q * num_groups
    if p > 1.0 + 1e-12:
        most = int(1.0 / q) if q > 0 else num_groups
        raise _validate.fail(
            f"cyclic sampling with num_groups groups draws each step from about N / num_groups "
            f"records (N = {n}), so the expected batch size must fit in one group: "
            f"sample_rate * num_groups = {p:.4g} must be <= 1", "num_groups", num_groups,
            f"Pass num_bands (BandMF) or min_sep (BLT) <= {most}, or use a smaller batch_size.")
    return min(p, 1.0)


def _dataset_size(data_loader: DataLoader, poisson_sampling: bool, sample_rate,
                  expected_batch_size) -> int | None:
    """``len(data_loader.dataset)``; ``None`` for a data set without a length when nothing
    needs the size (Poisson sampling off, and ``sample_rate`` and ``expected_batch_size``
    given)."""
    try:
        n = len(data_loader.dataset)
    except TypeError as e:
        if not poisson_sampling and None not in (sample_rate, expected_batch_size):
            return None
        raise ConfigError(
            f"the data set must have a length; got data_loader.dataset="
            f"{type(data_loader.dataset).__name__} without __len__. Use a map-style Dataset, "
            f"or pass poisson_sampling=False with sample_rate= and expected_batch_size= (the "
            f"accounting then assumes Poisson sampling at that rate).") from e
    if n == 0:
        raise _validate.fail("the data set must not be empty", "len(data_loader.dataset)", n,
                             "Check the data loading code.")
    return n


def sampling_rate(data_loader, n: int, sample_rate, expected_batch_size, loss_reduction: str,
                   poisson: bool) -> tuple[float, float]:
    """``(q, expected batch size)``, from the loader (size public) or given (size private)."""
    if sample_rate is not None or expected_batch_size is not None:
        if sample_rate is None or (expected_batch_size is None and loss_reduction == "mean"):
            raise _validate.fail(
                "sample_rate and expected_batch_size go together (they declare the data set's "
                "size private)", "sample_rate, expected_batch_size",
                (sample_rate, expected_batch_size), "Pass both, or neither.")
        q = _validate.unit_interval_right_closed("sample_rate", sample_rate,
                                                 "Pass the per-step inclusion probability.")
        expected = (_validate.positive("expected_batch_size", expected_batch_size,
                                       "Pass the batch size you expect on average.")
                    if expected_batch_size is not None else q * n)
        return q, expected
    batch_size = data_loader.batch_size
    if batch_size is None:
        raise _validate.fail(
            "the data loader must have a batch_size", "data_loader.batch_size", None,
            "Build it with DataLoader(dataset, batch_size=...), or pass sample_rate and "
            "expected_batch_size.")
    if batch_size > n:
        raise _validate.fail(
            f"batch_size must be at most the data set's size ({n})", "batch_size", batch_size,
            f"Use a batch size <= {n}.")
    return batch_size / n, float(batch_size)


