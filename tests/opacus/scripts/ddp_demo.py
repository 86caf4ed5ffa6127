"""Opacus tutorial ``ddp_tutorial.ipynb``, section 1: the file ``opacus_ddp_demo.py`` its cells
write (Apache-2.0, Meta Platforms), for privgrad's tests: only the imports from ``opacus``
changed.

Stand-ins (marked): MNIST -> learnable random images; CPU for the ranks' GPUs (``.to(rank)`` ->
``.to(DEVICE)``) and two processes for ``torch.cuda.device_count()``; a free port chosen by the
test for ``12355``; two epochs for ten. ``SampleConvNet`` is the MNIST example's, imported from
its port.
"""

# %% [cell 6]
import os
import torch.distributed as dist
import logging

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

def setup(rank, world_size):
    os.environ['MASTER_ADDR'] = 'localhost'
    os.environ['MASTER_PORT'] = os.environ.get('PRIVGRAD_TEST_MASTER_PORT', '12355')  # stand-in: '12355'

    # initialize the process group
    dist.init_process_group("gloo", rank=rank, world_size=world_size)

def cleanup():
    dist.destroy_process_group()

# %% [cell 8] the MNIST example's SampleConvNet
import torch.nn as nn
import torch.nn.functional as F

from tests.opacus.test_mnist import SampleConvNet

# %% [cell 9] stand-in: datasets.MNIST(DATA_ROOT, train=..., download=True, transform=...)
from tests.opacus.conftest import stand_in_images

DEVICE = "cpu"  # stand-in: each rank's GPU

mnist_train_ds = stand_in_images(400, (1, 28, 28), seed=1)

mnist_test_ds = stand_in_images(100, (1, 28, 28), seed=2)

# %% [cell 11]
import torch
import torch.optim as optim
from torch.utils.data import DataLoader, DistributedSampler

from privgrad.opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP  # was: opacus...
from torch.nn.parallel import DistributedDataParallel as DDP

from privgrad.opacus import PrivacyEngine  # was: from opacus import PrivacyEngine

LR = 0.1
BATCH_SIZE = 200
N_GPUS = torch.cuda.device_count()

def init_training(rank):
    model = SampleConvNet()
    #model = DDP(model) -- non-private
    model = DPDDP(model)

    optimizer = optim.SGD(model.parameters(), lr=LR, momentum=0)
    data_loader = DataLoader(
        mnist_train_ds,
        #batch_size=BATCH_SIZE // N_GPUS, -- non-private
        batch_size=BATCH_SIZE,
        #sampler=DistributedSampler(mnist_train_ds) -- non-private
    )

    if rank == 0:
        logger.info(
            f"(rank {rank}) Initialized model ({type(model).__name__}), "
            f"optimizer ({type(optimizer).__name__}), "
            f"data loader ({type(data_loader).__name__}, len={len(data_loader)})"
        )

    privacy_engine = PrivacyEngine()

    # PrivacyEngine looks at the model's class and enables
    # distributed processing if it's wrapped with DPDDP
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=1.,
        max_grad_norm=1.,
    )

    if rank == 0:
        logger.info(
            f"(rank {rank}) After privatization: model ({type(model).__name__}), "
            f"optimizer ({type(optimizer).__name__}), "
            f"data loader ({type(data_loader).__name__}, len={len(data_loader)})"
        )

    logger.info(f"(rank {rank}) Average batch size per GPU: {int(optimizer.expected_batch_size)}")

    return model, optimizer, data_loader, privacy_engine

# %% [cell 13]
import numpy as np

def test(model, device):
    test_loader = DataLoader(
        mnist_test_ds,
        batch_size=BATCH_SIZE,
    )

    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            pred = output.argmax(
                dim=1, keepdim=True
            )
            correct += pred.eq(target.view_as(pred)).sum().item()

    model.train()
    return correct / len(mnist_test_ds)

def launch(rank, world_size, epochs):
    setup(rank, world_size)
    criterion = nn.CrossEntropyLoss()

    model, optimizer, data_loader, privacy_engine = init_training(rank)
    model.to(DEVICE)  # stand-in: model.to(rank)
    model.train()


    for e in range(epochs):
        losses = []
        correct = 0
        total = 0

        for data, target in data_loader:
            data, target = data.to(DEVICE), target.to(DEVICE)  # stand-in: .to(rank)
            optimizer.zero_grad()
            output = model(data)

            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
            total += len(data)

            loss = criterion(output, target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        test_accuracy = test(model, DEVICE)  # stand-in: test(model, rank)
        train_accuracy = correct / total
        epsilon = privacy_engine.get_epsilon(delta=1e-5)

        if rank == 0:
            print(
                f"Epoch: {e} \t"
                f"Train Loss: {np.mean(losses):.4f} | "
                f"Train Accuracy: {train_accuracy:.2f} | "
                f"Test Accuracy: {test_accuracy:.2f} |"
                f"(ε = {epsilon:.2f})"
            )

    cleanup()

test.__test__ = False  # (the tutorial's evaluation function, not a pytest test)

# %% [cell 14]
import torch.multiprocessing as mp

EPOCHS = 2  # stand-in: 10
world_size = 2  # stand-in: torch.cuda.device_count()

if __name__ == '__main__':
    mp.spawn(
        launch,
        args=(world_size,EPOCHS,),
        nprocs=world_size,
        join=True
    )
