"""What each rank of an FSDP2 test job runs (``python -m tests.distributed.fsdp_workers fsdp``).

Like ``workers.py``: a rank joins the gloo group, runs the scenario and saves plain results to
``$PRIVGRAD_TEST_OUT/rank{RANK}.pt``; ``test_fsdp.py`` makes every assertion. The model is a
small stack of ``fully_shard`` blocks (Linear, LayerNorm) under a ``fully_shard`` root.
"""

from __future__ import annotations

import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.distributed.fsdp import ShardedDataParallel
from privgrad.errors import PrivgradError
from tests.distributed.workers import BATCH, STEPS, N, data, patched

SIGMA, C = 1.3, 0.7
NOISE_STEPS = 200


def model(shard: bool, half: bool = False, norm=nn.LayerNorm) -> nn.Module:
    """Two blocks and a head; every layer's row count is odd or small, so that the shards are
    uneven (5/4 rows, 2/1). ``half``: FSDP2 mixed precision (bf16 parameters gathered for the
    computation, float32 shards and reduce-scatters)."""
    net = nn.Sequential(nn.Sequential(nn.Linear(6, 9), nn.Tanh(), norm(9)),
                        nn.Sequential(nn.Linear(9, 3), nn.Tanh()),
                        nn.Sequential(nn.Linear(3, 3)))
    if shard:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if half else MixedPrecisionPolicy()
        for block in net:
            fully_shard(block, mp_policy=policy)
        fully_shard(net, mp_policy=policy)
    return net


def full(params) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in params]


def train(rank: int, *, shard: bool, sigma=0.0, seed=0, physical=None, half=False,
          norm=nn.LayerNorm, **kwargs) -> dict:
    """Eight private steps (momentum SGD; ``physical``: virtual batches of at most that many):
    the whole parameters after them, the indices each step used, the epsilon and q."""
    torch.manual_seed(seed)
    net = model(shard, half, norm)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    net, optimizer, dl = engine.make_private(
        module=net, optimizer=optimizer, data_loader=DataLoader(data(), batch_size=BATCH),
        noise_multiplier=sigma, max_grad_norm=0.5, distributed=None if shard else False,
        **kwargs)
    indices, logical = [], []
    while engine.steps < STEPS:
        with engine.virtual_batches(dl, max_physical_batch_size=physical or N) as batches:
            for x, y, i in batches:
                optimizer.zero_grad()
                F.cross_entropy(net(x).float(), y).backward()
                logical += i.tolist()
                before = engine.steps
                optimizer.step()
                if engine.steps > before:
                    indices.append(sorted(logical))
                    logical = []
                if engine.steps == STEPS:
                    break
    out = {"params": full(net.parameters()), "indices": indices, "q": engine.settings.sample_rate,
           "epsilon": engine.get_epsilon(1e-5), "steps": engine.accountant.steps,
           "sharded": engine._distributed is not None and engine._distributed.sharded}
    engine.detach()
    return out


def noise(rank: int, steps: int, mutant: dict | None = None) -> dict:
    """This rank's shard of ``p.grad`` of a Linear(40, 24) block (984 coordinates, 12 rows a
    rank) over ``steps`` steps whose per-sample gradients are all zero; every rank seeded alike
    (the usual recipe), which is what makes ranks drawing alike fail."""
    torch.manual_seed(100)
    net = nn.Sequential(nn.Sequential(nn.Linear(40, 24)))
    fully_shard(net[0])
    fully_shard(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    weight, bias = net[0][0].weight, net[0][0].bias
    rows = []
    with patched(mutant, ShardedDataParallel):  # (from make_private on: it seeds the noise)
        _, _, dl = engine.make_private(
            module=net, optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(torch.randn(100, 40)), batch_size=10),
            noise_multiplier=SIGMA, max_grad_norm=C)
        while len(rows) < steps:
            for (x,) in dl:
                optimizer.zero_grad()
                (net(x).sum() * 0.0).backward()
                optimizer.step()
                rows.append(torch.cat([weight.grad.to_local().reshape(-1),
                                       bias.grad.to_local()]).double())
                if len(rows) == steps:
                    break
    out = {"noise": torch.stack(rows), "weight_rows": weight.to_local().shape[0],
           "epsilon": engine.get_epsilon(1e-5)}
    engine.detach()
    return out


def refusals(rank: int) -> dict:
    """The messages of bad input on a sharded model (every rank must raise the same)."""
    def attempt(make):
        try:
            make()
        except PrivgradError as e:
            return type(e).__name__, str(e)
        return None

    def private(module, **kwargs):
        kwargs = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, **kwargs}
        return lambda: PrivacyEngine().make_private(
            module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
            data_loader=DataLoader(data(), batch_size=BATCH), **kwargs)

    def layer_is_a_unit():
        net = nn.Sequential(nn.Sequential(nn.Linear(6, 4)), nn.Linear(4, 3))
        fully_shard(net[0])
        fully_shard(net[1])
        fully_shard(net)
        return net

    def with_embedding():
        net = nn.Sequential(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(24, 3)))
        fully_shard(net[0])
        fully_shard(net)
        return net

    def root_not_sharded():
        net = nn.Sequential(nn.Sequential(nn.Linear(6, 4)), nn.Linear(4, 3))
        fully_shard(net[0])
        return net

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):  # fc's weight used again outside fc's call: no rule sees it
            return F.linear(torch.tanh(self.fc(x)), self.fc.weight)

    def weight_used_outside_its_call():
        """The sharded self-check: the first step raises on every rank, nothing released."""
        net = nn.Sequential(Tied(), nn.Sequential(nn.Linear(6, 3)))
        for block in net:
            fully_shard(block)
        fully_shard(net)
        before = full(net.parameters())
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        _, _, dl = PrivacyEngine().make_private(
            module=net, optimizer=optimizer, data_loader=DataLoader(data(), batch_size=BATCH),
            noise_multiplier=1.0, max_grad_norm=1.0)
        x, y, _ = next(iter(dl))
        try:
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        finally:
            unchanged = all(torch.equal(a, b) for a, b in zip(before, full(net.parameters())))
            assert unchanged, "a parameter moved"

    return {
        "tied": attempt(weight_used_outside_its_call),
        "layer_is_a_unit": attempt(private(layer_is_a_unit())),
        "embedding": attempt(private(with_embedding())),
        "root_not_sharded": attempt(private(root_not_sharded())),
        "alone": attempt(private(model(True), distributed=False)),
        "sigma": attempt(private(model(True), noise_multiplier=1.0 + 0.25 * rank)),
        "adaptive": attempt(private(model(True), clipping="adaptive")),
    }


def resumed(rank: int) -> dict:
    """The noisy run of ``train`` (sigma 1, seed 3) stopped after 4 steps, saved (model and
    optimizer with torch.distributed.checkpoint, the engine's state per rank), and resumed in
    fresh objects from another seed: the parameters after 8 steps; then the refusal of another
    rank's engine state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = os.path.join(os.environ["PRIVGRAD_TEST_OUT"], "checkpoint")

    def start(seed, load=False):
        torch.manual_seed(seed)
        net = model(True)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        if load:  # before make_private (get_state_dict steps a fresh optimizer to fill it)
            model_state, optimizer_state = get_state_dict(net, optimizer)
            saved = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(saved, checkpoint_id=folder)
            set_state_dict(net, optimizer, model_state_dict=saved["model"],
                           optim_state_dict=saved["optimizer"])
        engine = PrivacyEngine(accountant="rdp")
        _, _, dl = engine.make_private(
            module=net, optimizer=optimizer, data_loader=DataLoader(data(), batch_size=BATCH),
            noise_multiplier=1.0, max_grad_norm=0.5)
        return net, optimizer, engine, dl

    def steps(net, optimizer, engine, dl, until):
        while engine.steps < until:
            for x, y, _ in dl:
                optimizer.zero_grad()
                F.cross_entropy(net(x), y).backward()
                optimizer.step()
                if engine.steps == until:
                    break

    net, optimizer, engine, dl = start(3)
    steps(net, optimizer, engine, dl, STEPS // 2)
    model_state, optimizer_state = get_state_dict(net, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    torch.save(engine.state_dict(), os.path.join(folder, f"engine.rank{rank}.pt"))
    engine.detach()
    net, optimizer, engine, dl = start(999, load=True)
    dist.barrier()  # every rank's engine state is written
    engine.load_state_dict(torch.load(os.path.join(folder, f"engine.rank{rank}.pt")))
    steps(net, optimizer, engine, dl, STEPS)
    out = {"params": full(net.parameters()), "epsilon": engine.get_epsilon(1e-5)}
    engine.detach()
    _, _, other, _ = start(0)
    try:
        other.load_state_dict(torch.load(os.path.join(folder, f"engine.rank{1 - rank}.pt")))
    except PrivgradError as e:
        out["other_rank"] = (type(e).__name__, str(e))
    return out


def traffic(rank: int) -> dict:
    """The reduce-scatters of four steps (FSDP2's and privgrad's both go through
    ``dist.reduce_scatter_single``), as ``numel`` per call, per step."""
    torch.manual_seed(0)
    net = model(True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(module=net, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=1.0, max_grad_norm=1.0)
    original, calls, steps = dist.reduce_scatter_single, [], []

    def spy(*args, **kwargs):
        calls.append(kwargs["input"].numel())
        return original(*args, **kwargs)

    dist.reduce_scatter_single = spy
    try:
        for x, y, _ in dl:
            calls.clear()
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            steps.append(list(calls))
    finally:
        dist.reduce_scatter_single = original
    engine.detach()
    return {"steps": steps, "shapes": [tuple(p.shape) for p in net.parameters()]}


def secure(rank: int) -> dict:
    """Secure mode on the sharded model, summed loss (``p.grad`` is the release): each rank's
    shards over four steps, and the lattice spacing of the noise."""
    from privgrad.privatize.secure import lattice_spacing

    torch.manual_seed(0)
    net = model(True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp", secure_mode=True)
    _, _, dl = engine.make_private(module=net, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=1.0, max_grad_norm=0.5, loss_reduction="sum")
    rows = []
    for x, y, _ in dl:
        optimizer.zero_grad()
        F.cross_entropy(net(x), y, reduction="sum").backward()
        optimizer.step()
        rows.append(torch.cat([p.grad.to_local().reshape(-1) for p in net.parameters()]).double())
    engine.detach()
    return {"grads": torch.stack(rows), "spacing": lattice_spacing(0.5)}


def _alike(self, seed):  # mutant: every rank's noise seeded like rank 0's
    return self.broadcast_seed(seed)


MUTANTS = {
    "ranks seeded alike": {"noise_seed": _alike},
    "noise split as sigma/sqrt(world) per rank": {
        "noise_share": lambda self, std: std / math.sqrt(self.world_size)},
}


def fsdp(rank: int, world_size: int) -> dict:
    first = rank == 0
    return {
        "reference": train(rank, shard=False) if first else None,
        "sharded": train(rank, shard=True),
        "virtual": train(rank, shard=True, physical=3),
        "per_layer": train(rank, shard=True, clipping="per_layer"),
        "mixed": train(rank, shard=True, half=True),
        "automatic": train(rank, shard=True, clipping="automatic"),
        "automatic_reference": train(rank, shard=False, clipping="automatic") if first else None,
        "secure": secure(rank),
        "rms_norm": train(rank, shard=True, norm=nn.RMSNorm),
        "rms_norm_reference": train(rank, shard=False, norm=nn.RMSNorm) if first else None,
        "per_layer_reference": train(rank, shard=False, clipping="per_layer") if first else None,
        "noisy_reference": train(rank, shard=False, sigma=1.0, seed=3) if first else None,
        "noisy": train(rank, shard=True, sigma=1.0, seed=3),
        "noisy_again": train(rank, shard=True, sigma=1.0, seed=3),
        "resumed": resumed(rank),
        "traffic": traffic(rank),
        "noise": noise(rank, NOISE_STEPS),
        "mutants": {name: noise(rank, 20, mutant) for name, mutant in MUTANTS.items()},
        "refusals": refusals(rank),
    }


def main() -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.environ["PRIVGRAD_TEST_STORE"],
                            rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results = {"fsdp": {"fsdp": fsdp}[sys.argv[1]](rank, world_size)}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(os.environ["PRIVGRAD_TEST_OUT"], f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
