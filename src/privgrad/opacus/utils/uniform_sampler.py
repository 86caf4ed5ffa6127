"""``opacus.utils.uniform_sampler``: Poisson batch samplers on privgrad's ``PoissonSampler``.

Opacus's ``UniformWithReplacementSampler`` is a batch sampler whose every batch includes each
index independently with probability ``sample_rate`` (Poisson sampling; "with replacement" is
Opacus's name for it). Here the draws are privgrad's (``privgrad.sampling.PoissonSampler``:
exact 64-bit comparisons, each step's words from ``(seed, step)``), seeded once from the
``generator`` given or from PyTorch's global random state.

For ``make_private``, pass a plain ``DataLoader(dataset, batch_size=...)``: privgrad builds the
Poisson loader itself and refuses a loader with a custom batch sampler, this one included.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from privgrad import _validate
from privgrad.distributed import data_parallel
from privgrad.sampling import PoissonSampler, numpy_bits

__all__ = ["DistributedUniformWithReplacementSampler", "UniformWithReplacementSampler"]


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator))


class _PoissonBatches(Sampler[list[int]]):
    """Index lists from ``self._sampler`` (a privgrad Poisson sampler or a rank's share)."""

    _sampler: PoissonSampler

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self._sampler:
            yield indices.tolist()

    def __len__(self) -> int:
        return len(self._sampler)


class UniformWithReplacementSampler(_PoissonBatches):
    """Batches of indices in ``[0, num_samples)``, each included with probability
    ``sample_rate``; ``steps`` batches per pass (default ``round(1 / sample_rate)``).

    Privacy:
        Poisson sampling, as the accountants assume; batches may be empty.
    """

    def __init__(self, *, num_samples: int, sample_rate: float,
                 generator: torch.Generator | None = None, steps: int | None = None):
        self.num_samples = _validate.positive_int("num_samples", num_samples,
                                                  "Pass len(dataset).")
        self._sampler = PoissonSampler(self.num_samples, sample_rate,
                                       bits=numpy_bits(_seed(generator)), steps=steps)
        self.sample_rate = self._sampler.sample_rate
        self.steps = self._sampler.steps


class DistributedUniformWithReplacementSampler(_PoissonBatches):
    """This rank's share of one global Poisson sample per step over ``[0, total_size)``: index
    ``i`` belongs to rank ``i % world_size`` (privgrad's ``ShardedSampler``; the seed is
    rank 0's, so the ranks' shares partition one global sample).

    Args:
        total_size: the global data set's size.
        sample_rate: q, per record of the global data set.
        shuffle, shuffle_seed: accepted, unused (the sample is drawn afresh every step).
        generator: seeds rank 0's draw (default: PyTorch's global random state).

    Attributes:
        num_samples: how many indices this rank owns.
    """

    def __init__(self, *, total_size: int, sample_rate: float, shuffle: bool = True,
                 shuffle_seed: int = 0, generator: torch.Generator | None = None):
        ranks = data_parallel(None, torch.nn.Module(), True)
        if ranks is None:
            raise _validate.fail("a distributed sampler needs an initialised process group",
                                 "torch.distributed.is_initialized()", False,
                                 "Call torch.distributed.init_process_group first.")
        self.total_size = _validate.positive_int("total_size", total_size, "Pass len(dataset).")
        seed = ranks.broadcast_seed(_seed(generator))
        glob = PoissonSampler(self.total_size, sample_rate, bits=numpy_bits(seed))
        self._sampler = ranks.shard(glob)
        self.rank, self.world_size = ranks.rank, ranks.world_size
        self.num_samples = len(range(self.rank, self.total_size, self.world_size))
        self.sample_rate = glob.sample_rate
        self.steps = glob.steps
