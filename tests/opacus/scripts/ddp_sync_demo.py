"""Opacus tutorial ``ddp_tutorial.ipynb``, section 3: the file ``opacus_sync_demo.py`` its cells
write (Apache-2.0, Meta Platforms), for privgrad's tests: only the imports from ``opacus``
changed (and ``opacus_ddp_demo`` is the port of section 1). Stand-ins: CPU for the ranks' GPUs
(``.to(rank)`` -> ``.to(DEVICE)``), two processes for ``torch.cuda.device_count()``.
"""

# %% [cell 26]
import sys
sys.path.append('/data/home/shilov/opacus')

from tests.opacus.scripts.ddp_demo import setup, cleanup, mnist_train_ds, SampleConvNet, DEVICE  # was: from opacus_ddp_demo import ...
import logging
from torch.utils.data import DataLoader
import torch.optim as optim
from privgrad.opacus.data_loader import DPDataLoader  # was: from opacus.data_loader import ...
from privgrad.opacus import GradSampleModule  # was: from opacus import GradSampleModule
from privgrad.opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP  # was: opacus...
from privgrad.opacus.optimizers import DistributedDPOptimizer  # was: from opacus.optimizers import ...
from torch.nn.parallel import DistributedDataParallel as DDP

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

BATCH_SIZE = 64
LR = 64

def init_training(rank, world_size):
    model = SampleConvNet()
    optimizer = optim.SGD(model.parameters(), lr=LR, momentum=0)

    model = GradSampleModule(model)
    model = DPDDP(model)

    optimizer = DistributedDPOptimizer(
        optimizer=optimizer,
        noise_multiplier=0.,
        max_grad_norm=100.,
        expected_batch_size=BATCH_SIZE//world_size,
    )

    data_loader = DPDataLoader.from_data_loader(
        data_loader=DataLoader(
            mnist_train_ds,
            batch_size=BATCH_SIZE,
        ),
        distributed=True,
    )


    return model, optimizer, data_loader

# %% [cell 28]
import torch.nn as nn
import numpy as np

def launch(rank, world_size):
    setup(rank, world_size)
    criterion = nn.CrossEntropyLoss()

    model, optimizer, data_loader = init_training(rank, world_size)
    model.to(DEVICE)  # stand-in: model.to(rank)
    model.train()

    for data, target in data_loader:
        data = data
        target = torch.tensor(target)

        data, target = data.to(DEVICE), target.to(DEVICE)  # stand-in: .to(rank)
        optimizer.zero_grad()

        output = model(data)
        loss = criterion(output, target)
        loss.backward()

        flat_grad = torch.cat([p.grad_sample.sum(dim=0).view(-1) for p in model.parameters()]).cpu().numpy() / optimizer.expected_batch_size
        logger.info(
            f"(rank={rank}) Gradient norm before optimizer.step(): {np.linalg.norm(flat_grad):.4f}"
        )
        logger.info(
            f"(rank={rank}) Gradient sample before optimizer.step(): {flat_grad[:3]}"
        )

        optimizer.step()

        flat_grad = torch.cat([p.grad.view(-1) for p in model.parameters()]).cpu().numpy()
        logger.info(
            f"(rank={rank}) Gradient norm after optimizer.step(): {np.linalg.norm(flat_grad):.4f}"
        )
        logger.info(
            f"(rank={rank}) Gradient sample after optimizer.step(): {flat_grad[:3]}"
        )

        break

    cleanup()

# %% [cell 29]
import torch.multiprocessing as mp
import torch

world_size = 2  # stand-in: torch.cuda.device_count()

if __name__ == '__main__':
    mp.spawn(
        launch,
        args=(world_size,),
        nprocs=world_size,
        join=True
    )
