"""Data-parallel DP-SGD with torchrun: a digit classifier on 2 CPU processes, with the same
``make_private_with_epsilon`` call as in one process.

Data: the UCI handwritten digits that ship with scikit-learn (1,797 8x8 images, no download),
split 80/20 with a fixed seed. Every rank builds the same *global* training set and the same
loader (``batch_size`` is the expected batch size of the whole job); privgrad draws one Poisson
sample per step for the job and gives each rank the sampled examples it owns (index i goes to
rank i % world size). Ranks clip their own examples, the clipped sums are all-reduced once, and
rank 0 adds the noise, so the job releases what one process would, and reports the same epsilon.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # model wrapped in DDP
    torchrun --nproc_per_node=2 examples/ddp_train.py --no-ddp   # plain model: the same result
    python examples/ddp_train.py                                 # one process, for comparison

On loopback-only machines add ``GLOO_SOCKET_IFNAME=lo`` in front of torchrun. What it printed on
this project's 2-core development machine is in docs/distributed.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256, help="expected batch size of the job")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--no-ddp", action="store_true", help="pass the plain model, not a DDP one")
    p.add_argument("--out", type=Path, default=Path("runs/ddp"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def digits(seed: int):
    """Train and test tensors, the same on every rank (a fixed split, features scaled by the
    public constant 16, the pixels' maximum)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2,
                                                        random_state=seed, stratify=y)
    as_tensors = lambda a, b: (torch.tensor(a, dtype=torch.float32), torch.tensor(b))  # noqa: E731
    return as_tensors(x_train, y_train), as_tensors(x_test, y_test)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(args.seed)  # the same on every rank; privgrad does not rely on it

    (x_train, y_train), (x_test, y_test) = digits(args.seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model = net if args.no_ddp or world_size == 1 else DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    engine = PrivacyEngine()
    # The one call, unchanged: it finds the process group (distributed=None by default).
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size),
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm)
    if rank == 0:
        kind = "plain model" if model is net else "DDP model"
        print(f"{world_size} process(es), {kind}: sigma = "
              f"{engine.settings.noise_multiplier:.3f}, q = {engine.settings.sample_rate:.4f}, "
              f"{len(loader)} steps per epoch")

    start, examples = time.perf_counter(), 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        for x, y in loader:  # this rank's share of the step's Poisson sample (may be empty)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()  # every rank steps every time: the all-reduce is collective
            examples += len(x)
        if rank == 0 and (epoch % 10 == 0 or epoch == args.epochs):
            with torch.no_grad():
                accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch:3d}  test accuracy {accuracy:.3f}  "
                  f"epsilon {engine.get_epsilon(args.delta):.2f}")
    elapsed = time.perf_counter() - start

    # The ranks hold identical parameters: check it, and count the examples they used.
    checksum = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double().sum()
    totals = torch.tensor([checksum.item(), float(examples)], dtype=torch.float64)
    if dist.is_initialized():
        low, high = totals.clone(), totals.clone()
        dist.all_reduce(low[:1], op=dist.ReduceOp.MIN)
        dist.all_reduce(high[:1], op=dist.ReduceOp.MAX)
        dist.all_reduce(totals[1:], op=dist.ReduceOp.SUM)
        if low[0] != high[0]:
            raise SystemExit(f"ranks diverged: parameter sums {low[0]} and {high[0]}")
    if rank == 0:
        steps = args.epochs * len(loader)
        print(f"{steps} steps in {elapsed:.1f} s ({1000 * elapsed / steps:.1f} ms per step); "
              f"{int(totals[1])} examples sampled in all (expected "
              f"{engine.settings.sample_rate * len(x_train) * steps:.0f})")
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), args.out / "model.pt")  # the model's own keys, no prefix
        print(f"saved {args.out / 'model.pt'} (keys {', '.join(net.state_dict())})")
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be saving: tear the group down together
        # Let go of what holds the process group (DDP's reducer, and the engine's hooks that
        # keep the DDP model alive) while Python runs: a gloo group still held when the
        # interpreter exits can abort the process ("terminate called without an active
        # exception", about 1 run in 12 on a loaded 2-core machine).
        engine.detach()
        del model, optimizer, loader
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
