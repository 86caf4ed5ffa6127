"""``opacus.data_loader.DPDataLoader``: a Poisson-sampling ``DataLoader``, for hand-assembled
DP-SGD (``make_private`` builds its own loader and does not need this one).

The batch sampler is ``UniformWithReplacementSampler`` (or its distributed share), on privgrad's
Poisson sampler; an empty sample gives a batch of size 0 with the data's structure (privgrad's
``EmptyBatchCollate``), so the loop runs an ordinary step on it. ``from_data_loader`` derives q
as ``make_private`` does: ``batch_size / len(dataset)`` (Opacus: ``1 / len(data_loader)``,
slightly smaller when the last batch is partial).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from privgrad.opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from privgrad.sampling.loader import EmptyBatchCollate
from privgrad.sampling.plan import plan

__all__ = ["DPDataLoader"]


class DPDataLoader(DataLoader):
    """A ``DataLoader`` over ``dataset`` whose batches are Poisson samples at ``sample_rate``.

    Args:
        dataset: a map-style data set.
        sample_rate: q, each record's inclusion probability per batch.
        collate_fn: as for ``DataLoader`` (default ``default_collate``).
        drop_last: accepted, unused (Poisson batches have no fixed size).
        generator: seeds the sampling (default: PyTorch's global random state).
        distributed: each rank yields its share of one global sample per step.
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``...).

    Privacy:
        Batches are Poisson samples of the whole data set (see ``privgrad.sampling``); the
        accountant must be stepped at ``sample_rate`` once per batch.
    """

    def __init__(self, dataset, *, sample_rate: float, collate_fn=None, drop_last: bool = False,
                 generator: torch.Generator | None = None, distributed: bool = False, **kwargs):
        if distributed:
            batches = DistributedUniformWithReplacementSampler(
                total_size=len(dataset), sample_rate=sample_rate, generator=generator)
        else:
            batches = UniformWithReplacementSampler(
                num_samples=len(dataset), sample_rate=sample_rate, generator=generator)
        collate = EmptyBatchCollate(collate_fn if collate_fn is not None else default_collate,
                                    dataset)
        super().__init__(dataset, batch_sampler=batches, collate_fn=collate, **kwargs)
        self.sample_rate = batches.sample_rate
        self.distributed = distributed

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator: torch.Generator | None = None,
                         distributed: bool = False) -> DPDataLoader:
        """A ``DPDataLoader`` over ``data_loader``'s data set, collate function and workers,
        with ``q = batch_size / len(dataset)`` (checked as ``make_private`` checks it)."""
        sampling = plan(data_loader)
        dl = data_loader
        return cls(dl.dataset, sample_rate=sampling.sample_rate, collate_fn=dl.collate_fn,
                   generator=generator, distributed=distributed, num_workers=dl.num_workers,
                   pin_memory=dl.pin_memory, timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
                   multiprocessing_context=dl.multiprocessing_context,
                   persistent_workers=dl.persistent_workers)
