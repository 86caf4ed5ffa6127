"""One Poisson sample for the whole job, split between the ranks (NumPy only, no torch).

Every rank runs the same [`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler] over the
*global* data set and keeps the sampled indices it owns: index ``i`` belongs to rank
``i % world_size``. Striding (rather than contiguous blocks) spreads a data set sorted by label or
length evenly over ranks.

Privacy:
    Each index has exactly one owner, and the owner keeps it exactly when its sampler drew it.
    So the union of the ranks' batches at step ``t`` includes every record independently with
    probability ``q``, exactly once: it *is* a Poisson sample of the global data set, whatever the
    source of random bits. With the reproducible source and a seed shared by every rank (the
    engine broadcasts rank 0's), the union is also the very batch a single process with that seed
    would draw, which is what makes "two processes equal one process" testable. With the secure
    source (``os_bits``) every rank draws its own bits; each record's inclusion is then decided
    by its owner's draw alone, which is still independent with probability ``q``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from privgrad import _validate
from privgrad.sampling.poisson import PoissonSampler

__all__ = ["ShardedSampler"]


class ShardedSampler:
    """This rank's share of each step's global Poisson sample.

    Args:
        sampler: the global sampler (same ``num_records``, ``sample_rate`` and, for
            reproducible runs, the same seed on every rank).
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes sharing the sample.

    Attributes:
        step, bits: the global sampler's step counter and source of random words (read and
            written through, so a checkpoint restores the global sampler).
    """

    def __init__(self, sampler: PoissonSampler, rank: int, world_size: int):
        self.world_size = _validate.positive_int(
            "world_size", world_size, "Pass torch.distributed.get_world_size().")
        self.rank = _validate.nonnegative_int("rank", rank, "Pass torch.distributed.get_rank().")
        if self.rank >= self.world_size:
            raise _validate.fail(f"rank must be < world_size ({self.world_size})", "rank", rank,
                                 "Pass torch.distributed.get_rank().")
        self.sampler = sampler

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    @property
    def num_records(self) -> int:
        return self.sampler.num_records

    @property
    def steps(self) -> int:
        return self.sampler.steps

    @property
    def step(self) -> int:
        return self.sampler.step

    @step.setter
    def step(self, value: int) -> None:
        self.sampler.step = value

    @property
    def bits(self):
        return self.sampler.bits

    @bits.setter
    def bits(self, value) -> None:
        self.sampler.bits = value

    def own(self, indices: np.ndarray) -> np.ndarray:
        """The indices of a global sample that belong to this rank (order kept)."""
        return indices[indices % self.world_size == self.rank]

    def sample(self) -> np.ndarray:
        """This rank's share of the next step's sample (sorted, int64, possibly empty)."""
        return self.own(self.sampler.sample())

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(len(self)):
            yield self.sample()

    def __len__(self) -> int:
        return len(self.sampler)
