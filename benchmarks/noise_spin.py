"""Milliseconds for privgrad's CPU noise streams after a pause and right after a parallel product,
with PyTorch's OpenMP threads spinning by default and with a shorter spin.

    python benchmarks/noise_spin.py                 # the sizes of the MLP and the embedding models
    python benchmarks/noise_spin.py --spins 0,10000 --sizes 6400000

After every parallel region (a matrix product, a large elementwise operation) libgomp's idle
threads spin for ``GOMP_SPINCOUNT`` rounds (300,000 by default: several milliseconds) before they
sleep. A noise draw that starts meanwhile, such as privgrad's right after the backward pass,
shares the cores with them. libgomp reads the variable when it is loaded, so every setting runs
in a fresh subprocess; each prints the median over ``--repeats`` draws of each kind, interleaved.
Every size is drawn in privgrad's parallel streams (``TorchGaussian(parallel_min=1)``), also
those below the default threshold (``PARALLEL_MIN``), to show where that threshold would lie.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(sizes: list[int], repeats: int) -> dict:
    import torch

    from privgrad.privatize import TorchGaussian

    source = TorchGaussian(parallel_min=1)  # every size in streams
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    out = {}
    for n in sizes:
        buf = torch.empty(n)
        source.fill(buf, 1.0)  # warm-up: pages, thread pool
        paused, after = [], []
        for _ in range(repeats):
            time.sleep(0.05)  # long past any spin: the threads sleep
            t0 = time.perf_counter()
            source.fill(buf, 1.0)
            paused.append(time.perf_counter() - t0)
            time.sleep(0.05)
            for _ in range(3):
                a @ b  # a parallel region ends just before the draw
            t0 = time.perf_counter()
            source.fill(buf, 1.0)
            after.append(time.perf_counter() - t0)
        out[str(n)] = [statistics.median(paused) * 1e3, statistics.median(after) * 1e3]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="540000,6400000", help="noise draws, comma-separated")
    ap.add_argument("--spins", default="default,10000",
                    help="GOMP_SPINCOUNT values to compare ('default': leave it unset)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        ap.error(f"--sizes must be comma-separated whole numbers; got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        ap.error(f"--sizes must name at least one draw of 1 or more numbers; got {args.sizes!r}")
    spins = [s for s in args.spins.split(",") if s]
    bad = [s for s in spins if s != "default" and not s.isdigit()]
    if bad or not spins:
        ap.error(f"--spins takes 'default' or counts of 0 or more; got {args.spins!r}")
    if args.repeats < 1:
        ap.error(f"--repeats must be 1 or more; got {args.repeats}")
    if args.worker:
        print(json.dumps(worker(sizes, args.repeats)))
        return

    print(f"# privgrad noise streams, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"median ms of {args.repeats} draws each; each row a fresh process\n")
    print("| GOMP_SPINCOUNT | draws | after a pause | right after a product |")
    print("|---|---|---|---|")
    for spin in spins:
        env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
        if spin != "default":
            env["GOMP_SPINCOUNT"] = spin
        done = subprocess.run([sys.executable, __file__, "--worker", "--sizes", args.sizes,
                               "--repeats", str(args.repeats)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {spin} | - | error: {last[:100]} | |")
            continue
        for n, (paused, after) in json.loads(done.stdout.splitlines()[-1]).items():
            print(f"| {spin} | {int(n):,} | {paused:.1f} | {after:.1f} |")


if __name__ == "__main__":
    main()
