"""Bad input that needs no process group: clear errors, raised before anything is attached.

The errors that need one (a rank with another configuration, DDP without data-parallel
training, ...) run in a real job: see ``test_data_parallel.py``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from privgrad import PrivacyEngine
from privgrad.errors import ConfigError, ConfigTypeError
from tests.helpers import classification_data, mlp


def make_private(data_loader=None, **kwargs):
    model = mlp()
    engine = PrivacyEngine()
    data_loader = data_loader or DataLoader(classification_data(), batch_size=8)
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        data_loader=data_loader, noise_multiplier=1.0, max_grad_norm=1.0,
                        **kwargs)
    return engine, model


def test_no_process_group_means_one_process():
    assert not torch.distributed.is_initialized()
    engine, _ = make_private()
    assert engine._distributed is None and not engine.data_parallel


def test_distributed_true_without_a_process_group():
    with pytest.raises(ConfigError, match=r"distributed=True needs an initialised torch\."
                       r"distributed process group; got torch\.distributed\.is_initialized\(\)="
                       r"False\. Call torch\.distributed\.init_process_group"):
        make_private(distributed=True)


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_distributed_must_be_a_bool_or_none(value):
    with pytest.raises(ConfigTypeError, match=r"distributed must be True, False or None; got "
                       rf"distributed={value!r}\."):
        make_private(distributed=value)


def _sharded(data):
    return DistributedSampler(data, num_replicas=2, rank=0)


@pytest.mark.parametrize("build", [
    lambda data: DataLoader(data, batch_size=4, sampler=_sharded(data)),
    lambda data: DataLoader(data, batch_sampler=BatchSampler(_sharded(data), 4, False)),
], ids=["sampler", "batch_sampler"])
def test_a_distributed_sampler_is_refused_with_the_fix(build):
    data = classification_data()
    with pytest.raises(ConfigError, match=r"the data loader must cover the whole data set.*got "
                       r"data_loader\.sampler=DistributedSampler\. Build DataLoader\(full_dataset"):
        make_private(build(data))


def test_a_distributed_sampler_is_refused_by_make_private_with_epsilon_too():
    data = classification_data()
    model = mlp()
    with pytest.raises(ConfigError, match="got data_loader.sampler=DistributedSampler"):
        PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=4, sampler=_sharded(data)),
            target_epsilon=3.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0)


FSDP2 = """
import os, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset
from privgrad import PrivacyEngine
from privgrad.errors import ConfigError
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str({port}))
dist.init_process_group("gloo", rank=0, world_size=1)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
fully_shard(model[0])
fully_shard(model)
engine = PrivacyEngine()
try:
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        data_loader=DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4),
                        noise_multiplier=1.0, max_grad_norm=1.0)
except ConfigError as e:
    print("refused:", e)
print("attached:", engine.module is not None)
dist.destroy_process_group()
"""


def test_an_fsdp2_model_is_refused_with_the_fix():
    """Sharded (DTensor) parameters: a clear error naming DDP, not an operator missing a
    sharding strategy deep inside the first broadcast (what torch raised before)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", FSDP2.format(port=port)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: privgrad trains whole (unsharded) parameters; got 4 sharded parameter(s)" \
        in done.stdout and "issue 27" in done.stdout and "DistributedDataParallel" in done.stdout
    assert "attached: False" in done.stdout
