"""What each rank of a test job runs (``python -m tests.distributed.workers SCENARIO``).

A rank joins the gloo group described by the environment (see ``launch.py``), runs the
scenario, and saves a dict of plain results to ``$PRIVGRAD_TEST_OUT/rank{RANK}.pt``; the tests
make every assertion on those results in the pytest process. Scenarios:

* ``suite`` (2 ranks): equivalence with one process (sigma = 0 and sigma > 0, plain and DDP
  models, virtual batches that split the ranks' batches differently), the shards of the Poisson
  sample, the collective calls of a step, DDP's gradient traffic, secure mode's lattice release,
  the bad-input errors that need a process group, and the noise statistics;
* ``variance`` (any world size): the noise statistics alone;
* ``all`` (4 ranks): ``variance`` on 4 ranks, then ``suite`` on ranks 0 and 1.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.distributed import DataParallel
from privgrad.errors import PrivgradError
from privgrad.mechanisms import BandMF
from privgrad.privatize.secure import lattice_spacing
from tests.helpers import drawn

N, BATCH, STEPS = 64, 16, 8          # equivalence: q = 1/4, two epochs
SIGMA, C = 1.3, 0.7                  # noise statistics: as tests/privacy/checks.py
NOISE_STEPS, MUTANT_STEPS = 200, 20
ADAPTIVE = {"clipping": "adaptive", "target_quantile": 0.7, "quantile_lr": 0.5}


BANDMF = {"mechanism": BandMF(num_bands=2), "steps": STEPS}


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g),
                         torch.arange(N))


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train(rank: int, *, distributed, ddp=False, sigma=0.0, seed=0, **clipping) -> dict:
    """Eight private steps (momentum SGD, virtual batches of at most 3); the parameters, the
    indices each step used and the epsilon. Rank r > 0 starts from another seed: its model and
    its generator must not matter."""
    torch.manual_seed(seed if rank == 0 else seed + 1000 + rank)
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    wrapped = DistributedDataParallel(net) if ddp else net
    wrapped, optimizer, dl = engine.make_private(
        module=wrapped, optimizer=optimizer, data_loader=DataLoader(data(), batch_size=BATCH),
        noise_multiplier=sigma, max_grad_norm=0.5, distributed=distributed, **clipping)
    indices, chunks, logical, count = [], [], [], 0
    while engine.steps < STEPS:
        with engine.virtual_batches(dl, max_physical_batch_size=3) as batches:
            for x, y, i in batches:
                optimizer.zero_grad()
                F.cross_entropy(wrapped(x), y).backward()
                logical += i.tolist()
                count += 1
                before = engine.steps
                optimizer.step()
                if engine.steps > before:
                    indices.append(sorted(logical))
                    chunks.append(count)
                    logical, count = [], 0
                if engine.steps == STEPS:
                    break
    sparse_sums = engine._clipped.sparse_sums  # sparse embedding sums cannot be all-reduced
    engine.detach()
    return {"params": [p.detach().clone() for p in net.parameters()], "indices": indices,
            "sparse_sums": sparse_sums,
            "chunks": chunks, "epsilon": engine.get_epsilon(1e-5),
            "bounds": None if engine.adaptive_clipping is None else engine.adaptive_clipping.bounds,
            "q": engine.settings.sample_rate, "steps": engine.accountant.steps}


@contextmanager
def spied_collectives():
    """The collective calls made inside the block, as ``(name, numel)`` (Python-level calls,
    DDP's communication hooks included)."""
    calls = []
    originals = {name: getattr(dist, name) for name in
                 ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_object",
                  "reduce_scatter")}

    def spy(name):
        def call(tensor, *args, **kwargs):
            calls.append((name, tensor.numel() if isinstance(tensor, torch.Tensor) else None))
            return originals[name](tensor, *args, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, spy(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def count_collectives(rank: int) -> dict:
    """Which collective calls one training run makes after make_private (Python-level calls)."""
    torch.manual_seed(0)
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(module=net, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=1.0, max_grad_norm=1.0)
    with spied_collectives() as calls:
        for x, y, _ in dl:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    return {"calls": calls, "steps": engine.steps,
            "numel": sum(p.numel() for p in net.parameters())}


def ddp_traffic(rank: int) -> dict:
    """A backward pass on a DDP model: while privgrad is attached, no collective call (DDP's
    raw all-reduce is off) and no raw gradient left in ``p.grad``; after ``detach``, DDP's
    all-reduce and its average in ``p.grad`` again."""
    torch.manual_seed(0)
    net = model()
    ddp = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    engine.make_private(module=ddp, optimizer=optimizer,
                        data_loader=DataLoader(data(), batch_size=BATCH),
                        noise_multiplier=1.0, max_grad_norm=1.0)
    x, y, _ = data()[rank * 8:(rank + 1) * 8]

    def local_grad():
        params = {k: v.detach() for k, v in net.named_parameters()}
        return torch.func.grad(lambda p: F.cross_entropy(
            torch.func.functional_call(net, p, (x,)), y))(params)

    out = {"local": local_grad()}
    optimizer.zero_grad()
    drawn(engine, len(x))
    with spied_collectives() as out["attached_calls"]:
        F.cross_entropy(ddp(x), y).backward()
    out["attached"] = {k: p.grad for k, p in net.named_parameters()}
    engine.detach()
    optimizer.zero_grad()
    with spied_collectives() as out["detached_calls"]:
        F.cross_entropy(ddp(x), y).backward()
    out["detached"] = {k: p.grad.clone() for k, p in net.named_parameters()}
    return out


def refusals(rank: int) -> dict:
    """The messages of the errors that need a process group (every rank must raise)."""
    def attempt(make):
        try:
            make()
        except PrivgradError as e:
            return type(e).__name__, str(e)
        return None

    def private(module=None, dataset=None, **kwargs):
        module = module if module is not None else model()
        kwargs = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, **kwargs}
        return lambda: PrivacyEngine().make_private(
            module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
            data_loader=DataLoader(dataset or data(), batch_size=BATCH), **kwargs)

    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model()
            self.register_buffer("scale", torch.ones(6))

        def forward(self, x):
            return self.net(x * self.scale)

    hooked = DistributedDataParallel(model())
    hooked.register_comm_hook(None, lambda state, bucket: torch.futures.Future())
    return {
        "sigma": attempt(private(noise_multiplier=1.0 + 0.25 * rank)),
        "dataset": attempt(private(dataset=TensorDataset(*data()[:N - rank]))),
        "model": attempt(private(module=nn.Linear(6, 3 + rank))),
        "ddp_alone": attempt(private(module=DistributedDataParallel(model()), distributed=False)),
        "poisson_off": attempt(private(poisson_sampling=False)),
        "ddp_buffers": attempt(private(module=DistributedDataParallel(WithBuffer()))),
        "ddp_hooked": attempt(private(module=hooked)),
    }


def noise(world_size: int, steps: int, mutant: dict | None = None,
          distributed=None) -> torch.Tensor:
    """``p.grad`` of a Linear(40, 25) (1,025 coordinates) over ``steps`` steps whose per-sample
    gradients are all zero. Every rank seeds torch identically (the usual DDP recipe), which is
    what makes a naive per-rank noise split fail. ``mutant``: DataParallel methods to replace."""
    torch.manual_seed(100 + world_size)
    net = nn.Linear(40, 25)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(
        module=net, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(torch.randn(100, 40)), batch_size=10),
        noise_multiplier=SIGMA, max_grad_norm=C, distributed=distributed)
    rows = []
    with patched(mutant):
        while len(rows) < steps:
            for (x,) in dl:
                optimizer.zero_grad()
                (net(x).sum() * 0.0).backward()
                optimizer.step()
                rows.append(torch.cat([net.weight.grad.reshape(-1), net.bias.grad]).double())
                if len(rows) == steps:
                    break
    return torch.stack(rows)


@contextmanager
def patched(mutant: dict | None, cls=DataParallel):
    """Replace methods of ``cls`` for the duration (a mutant), then restore them."""
    originals = {name: cls.__dict__[name] for name in mutant or {}}
    for name, replacement in (mutant or {}).items():
        setattr(cls, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(cls, name, original)


def secure(rank: int, world_size: int, mutant: dict | None = None) -> dict:
    """Secure mode with real clipped sums on every rank (sum reduction, so ``p.grad`` is the
    release itself): the four steps' gradients and the lattice spacing of the noise."""
    torch.manual_seed(0)
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp", secure_mode=True)
    _, _, dl = engine.make_private(module=net, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=1.0, max_grad_norm=0.5, loss_reduction="sum")
    rows, examples = [], 0
    with patched(mutant):
        for x, y, _ in dl:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y, reduction="sum").backward()
            optimizer.step()
            rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double())
            examples += len(x)
    return {"grads": torch.stack(rows), "spacing": lattice_spacing(0.5), "examples": examples}


def _summed(self, grads):  # every rank's release added up, instead of rank 0's broadcast
    return self._collective(grads, lambda flat: dist.all_reduce(flat, group=self.group))


# Design 2 of docs/distributed.md: rank 0 noises its own clipped sum, then all ranks all-reduce.
NOISE_BEFORE_ALL_REDUCE = {"reduce_sums": lambda self, sums, params: sums,
                           "broadcast_release": _summed}


# Wrong designs of the noise, as replacements of DataParallel's methods: each rank noising its
# own clipped sum before an all-reduce (fully, or with its "share" sigma C / sqrt(world)), and
# rank 0 adding only such a share.
MUTANTS = {
    "full noise on every rank": {
        "reduce_sums": lambda self, sums, params: sums,
        "noise_share": lambda self, std: std,
        "broadcast_release": _summed},
    "noise split as sigma/sqrt(world) per rank": {
        "reduce_sums": lambda self, sums, params: sums,
        "noise_share": lambda self, std: std / math.sqrt(self.world_size),
        "broadcast_release": _summed},
    "rank 0 adds a sigma/sqrt(world) share": {
        "noise_share": lambda self, std: (std / math.sqrt(self.world_size) if self.rank == 0
                                          else 0.0)},
}


def variance(rank: int, world_size: int) -> dict:
    """The noise of the job, and of each mutant of the noise rule (world size > 1)."""
    out = {"noise": noise(world_size, NOISE_STEPS), "mutants": {}}
    if world_size > 1:
        out["mutants"] = {name: noise(world_size, MUTANT_STEPS, mutant)
                          for name, mutant in MUTANTS.items()}
    return out


def suite(rank: int, world_size: int) -> dict:
    first = rank == 0  # the single-process references run on rank 0 only
    return {"reference": train(rank, distributed=False) if first else None,
            "plain": train(rank, distributed=None),
            "ddp": train(rank, distributed=True, ddp=True),
            "noisy_reference": train(rank, distributed=False, sigma=1.0, seed=3) if first else None,
            "noisy": train(rank, distributed=None, sigma=1.0, seed=3),
            "adaptive_reference": train(rank, distributed=False, sigma=1.0, seed=3,
                                        **ADAPTIVE) if first else None,
            "adaptive": train(rank, distributed=True, ddp=True, sigma=1.0, seed=3, **ADAPTIVE),
            "per_layer_adaptive_reference": train(
                rank, distributed=False, sigma=1.0, seed=3,
                **{**ADAPTIVE, "clipping": "per_layer_adaptive"}) if first else None,
            "per_layer_adaptive": train(rank, distributed=True, sigma=1.0, seed=3,
                                        **{**ADAPTIVE, "clipping": "per_layer_adaptive"}),
            # correlated noise: rank 0's streams, the job's cyclic sample (issue 22)
            "bandmf_reference": train(rank, distributed=False, sigma=1.0, seed=3,
                                      **BANDMF) if first else None,
            "bandmf": train(rank, distributed=True, ddp=True, sigma=1.0, seed=3, **BANDMF),
            "collectives": count_collectives(rank),
            "ddp_traffic": ddp_traffic(rank),
            "refusals": refusals(rank),
            "secure": secure(rank, world_size),
            "secure_mutant": secure(rank, world_size, NOISE_BEFORE_ALL_REDUCE),
            # world size 1 is the single-process mechanism itself
            "single": noise(1, NOISE_STEPS, distributed=False) if first else None,
            **variance(rank, world_size)}


# scenario -> its phases: (world size, function); ranks beyond a phase's world size skip it
SCENARIOS = {
    "all": [(4, variance), (2, suite)],
    "suite": [(2, suite)],
    "variance": [(None, variance)],
}


def main() -> None:
    """Run the scenario's phases, each in a new default process group (one process start per
    rank for the whole job: starting Python with torch is the slowest part of these tests)."""
    rank, launched = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    results = {}
    for k, (size, phase) in enumerate(SCENARIOS[sys.argv[1]]):
        world_size = size or launched
        if rank >= world_size:
            break
        store = f"{os.environ['PRIVGRAD_TEST_STORE']}.{k}"
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        try:
            results[phase.__name__] = phase(rank, world_size)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    torch.save(results, os.path.join(os.environ["PRIVGRAD_TEST_OUT"], f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
