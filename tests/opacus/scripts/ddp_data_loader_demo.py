"""Opacus tutorial ``ddp_tutorial.ipynb``, section 2: the file
``opacus_distributed_data_loader_demo.py`` its cells write (Apache-2.0, Meta Platforms), for
privgrad's tests: only the imports from ``opacus`` changed (and ``opacus_ddp_demo`` is the port
of section 1). Stand-in: two processes for ``torch.cuda.device_count()``.
"""

# %% [cell 20]
from tests.opacus.scripts.ddp_demo import setup, cleanup, mnist_train_ds  # was: from opacus_ddp_demo import ...
import logging
from torch.utils.data import DataLoader, DistributedSampler
from privgrad.opacus.data_loader import DPDataLoader  # was: from opacus.data_loader import ...

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

BATCH_SIZE = 64

def init_data(rank, world_size):
    setup(rank, world_size)

    non_distributed_dl = DataLoader(
        mnist_train_ds,
        batch_size=BATCH_SIZE
    )

    distributed_non_private_dl = DataLoader(
        mnist_train_ds,
        batch_size=BATCH_SIZE // world_size,
        sampler=DistributedSampler(mnist_train_ds),
    )

    private_dl = DPDataLoader.from_data_loader(non_distributed_dl, distributed=True)

    if rank == 0:
        logger.info(
            f"(rank {rank}) Non-distributed non-private data loader. "
            f"#batches: {len(non_distributed_dl)}, "
            f"#data points: {len(non_distributed_dl.sampler)}, "
            f"batch_size: {non_distributed_dl.batch_size}"
        )

        logger.info(
            f"(rank {rank}) Distributed, non-private data loader. "
            f"#batches: {len(distributed_non_private_dl)}, "
            f"#data points: {len(distributed_non_private_dl.sampler)}, "
            f"batch_size: {distributed_non_private_dl.batch_size}"
        )

        logger.info(
            f"(rank {rank}) Distributed, private data loader. "
            f"#batches: {len(private_dl)}, "
            f"#data points: {private_dl.batch_sampler.num_samples}, "
            f"sample_rate: {private_dl.sample_rate:4f}, "
            f"avg batch_size (=sample_rate*num_data_points): {int(private_dl.sample_rate*private_dl.batch_sampler.num_samples)}"
        )

# %% [cell 21]
import torch
import torch.multiprocessing as mp

world_size = 2  # stand-in: torch.cuda.device_count()

if __name__ == '__main__':
    mp.spawn(
        init_data,
        args=(world_size,),
        nprocs=world_size,
        join=True
    )
