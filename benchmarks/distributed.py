"""Data-parallel step time: 1 process against 2 gloo processes on this machine's CPUs.

    python benchmarks/distributed.py                    # the table
    python benchmarks/distributed.py --steps 60 --batch-size 512 --hidden 1024

Every number is measured in this run; nothing is asserted. One logical step is forward, backward
and ``optimizer.step()`` on each rank's share of the batch; the time is rank 0's wall-clock time
per step (the median, and the best, over the timed steps, after a barrier and ``--warmup``
untimed steps), so it includes waiting for the slowest rank and the communication. "speed-up"
is the 1-process median of the same kind of run divided by this row's. "CPU ms" is rank 0's
process CPU time per step (median): it does not count time spent waiting for a core, so on a
loaded machine it shows how the work splits between ranks better than the wall clock does.
Each process uses one
thread, so two processes use two cores where one process uses one. The machine's load average
is printed with the table: on a shared machine it moves the numbers more than anything else.

Rows: the non-private baseline (a plain loop; DDP's own all-reduce with 2 processes) and privgrad
on the same model, expected batch size and data: on 2 processes both with the plain model
(privgrad synchronises it) and with the model wrapped in ``DistributedDataParallel``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine

# name, world size, private, wrap in DDP
RUNS = [
    ("non-private", 1, False, False),
    ("privgrad", 1, True, False),
    ("non-private (DDP)", 2, False, True),
    ("privgrad", 2, True, False),
    ("privgrad (DDP model)", 2, True, True),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=256, help="expected batch size of the job")
    p.add_argument("--records", type=int, default=25_600, help="data set size (q = batch / N)")
    p.add_argument("--hidden", type=int, default=512, help="width of the 784-h-h-10 MLP")
    return p.parse_args(argv)


def build(args):
    torch.manual_seed(0)
    h = args.hidden
    model = nn.Sequential(nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                          nn.Linear(h, 10))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(args.records, 784, generator=g),
                         torch.randint(0, 10, (args.records,), generator=g))
    return model, data


def worker(rank: int, world_size: int, store: str, run: tuple, args, results) -> None:
    name, _, private, ddp = run
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=120))
    model, data = build(args)
    wrapped = DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if private:
        engine = PrivacyEngine()
        wrapped, optimizer, loader = engine.make_private(
            module=wrapped, optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=args.batch_size),
            noise_multiplier=1.0, max_grad_norm=1.0)
    else:  # this rank's fixed-size share of the batch, shuffled
        share = torch.arange(rank, len(data), world_size)
        loader = DataLoader(torch.utils.data.Subset(data, share.tolist()),
                            batch_size=args.batch_size // world_size, shuffle=True)
    times, cpu = [], []
    batches = iter(loader)
    if world_size > 1:
        dist.barrier()
    for step in range(args.warmup + args.steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    if rank == 0:
        results[name, world_size] = (statistics.median(times), min(times), statistics.median(cpu))
    if world_size > 1:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        for k, run in enumerate(RUNS):
            world_size = run[1]
            store = os.path.join(tmp, f"store{k}")
            mp.start_processes(worker, args=(world_size, store, run, args, results),
                               nprocs=world_size, start_method="spawn")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    params = sum(p.numel() for p in build(args)[0].parameters())
    print(f"MLP 784-{args.hidden}-{args.hidden}-10 ({params:,} parameters), expected batch "
          f"{args.batch_size} of {args.records:,} (q = {args.batch_size / args.records:g}), "
          f"median of {args.steps} steps, 1 thread per process, load average {load:.1f} on "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'run':<22}{'processes':>10}{'ms / step':>11}{'(best)':>9}{'CPU ms':>9}"
          f"{'examples / s':>14}{'speed-up':>10}")
    for name, world_size, private, _ in RUNS:
        t, best, cpu = results[name, world_size]
        single = results["privgrad" if private else "non-private", 1][0]
        print(f"{name:<22}{world_size:>10}{1000 * t:>11.1f}{1000 * best:>9.1f}{1000 * cpu:>9.1f}"
              f"{args.batch_size / t:>14.0f}{single / t:>9.2f}x")
    for world_size, baseline in ((1, "non-private"), (2, "non-private (DDP)")):
        ratio = results["privgrad", world_size][0] / results[baseline, world_size][0]
        print(f"privgrad / non-private, {world_size} process(es): {ratio:.2f}x the time per step")


if __name__ == "__main__":
    main()
