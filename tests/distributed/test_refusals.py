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
import os, torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset
from privgrad import PrivacyEngine
from privgrad.errors import ConfigError
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str({port}))
dist.init_process_group("gloo", rank=0, world_size=1)
data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
fully_shard(model[0])
fully_shard(model)
engine = PrivacyEngine()
try:
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        data_loader=DataLoader(data, batch_size=4),
                        noise_multiplier=1.0, max_grad_norm=1.0)
except ConfigError as e:
    print("refused:", e)
print("attached:", engine.module is not None)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
fully_shard(model)  # the model wrapped whole
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private(
    module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=4),
    noise_multiplier=1.0, max_grad_norm=1.0)
for x, y in loader:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
print("whole model:", engine.data_parallel, engine._distributed.sharded, engine.steps,
      type(model[0].weight.grad).__name__)
from torch.distributed.fsdp import FullyShardedDataParallel  # FSDP1 (cannot be built on CPU)
old = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
nn.Module.__init__(old)
old._modules["_fsdp_wrapped_module"] = nn.Linear(4, 8)
model = nn.Sequential(old, nn.Sequential(nn.Linear(8, 2)))
fully_shard(model[1])
try:
    PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0)
except ConfigError as e:
    print("mixed:", e)
dist.destroy_process_group()
"""


def test_an_fsdp2_layer_that_is_its_own_unit_is_refused_and_a_whole_model_trains():
    """fully_shard on a layer privgrad clips: its rule would see the shard, not the weight (a
    clear error naming the layer and the fix); the model wrapped whole trains (world size 1);
    a model mixing FSDP1 and FSDP2 is refused."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-W", "error", "-c", FSDP2.format(port=port)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: a layer privgrad clips must run inside a fully_shard block, not be one" \
        in done.stdout and "got fully_shard on='0 (FSDPLinear)'" in done.stdout
    assert "attached: False" in done.stdout
    assert "whole model: True True 4 DTensor" in done.stdout
    assert ("mixed: privgrad shards with FSDP2 (torch.distributed.fsdp.fully_shard) only, not a "
            "model mixing FSDP1 and FSDP2; got FullyShardedDataParallel modules=['0']. Build "
            "the model with fully_shard(block)") in done.stdout
