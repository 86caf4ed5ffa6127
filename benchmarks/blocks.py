"""Does interleaving, or the baseline's allocator, move privgrad's ratio to its floor?

    python benchmarks/blocks.py --models lstm,cnn --batch 64
    MALLOC_MMAP_THRESHOLD_=1099511627776 MALLOC_TRIM_THRESHOLD_=1099511627776 \\
        python benchmarks/blocks.py --models lstm,cnn --batch 64

One process per model: the non-private step, the floor and privgrad's step (as
``reference_models.prepare`` builds them), timed two ways in every round: one step of each in
turn (as ``step_time.py --in-process``), then ``--block`` consecutive steps of each (after one
untimed step, the first after a switch). Wall-clock medians in ms; ``x floor`` is privgrad's
median over the floor's. Run it with glibc's defaults and with its mmap and trim thresholds out
of reach (the second command, what ``step_time.py --malloc-tuned`` sets): with the defaults a
step that asks for fresh large blocks pays page faults at every step, and privgrad, which keeps
its work arrays and noise buffer, does not (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import parse_models, prepare  # noqa: E402

VARIANTS = ("nonprivate", "floor", "privgrad")


def measure(name: str, batch: int, rounds: int, block: int) -> dict[str, dict[str, float]]:
    """``{"interleaved" | "blocks": {variant: median ms}}``."""
    torch.manual_seed(0)
    steps = {v: prepare(name, batch, v).step for v in VARIANTS}
    for step in steps.values():
        for _ in range(3):
            step()

    def timed(step) -> float:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3

    runs = {"interleaved": {v: [] for v in VARIANTS}, "blocks": {v: [] for v in VARIANTS}}
    for _ in range(rounds):
        for v, step in steps.items():
            runs["interleaved"][v].append(timed(step))
        for v, step in steps.items():
            step()
            runs["blocks"][v].extend(timed(step) for _ in range(block))
    return {how: {v: statistics.median(t) for v, t in times.items()} for how, times in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lstm,cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=4)
    args = ap.parse_args()
    models = parse_models(ap, args.models)
    for flag, value in (("--batch", args.batch), ("--rounds", args.rounds), ("--block", args.block)):
        if value < 1:
            ap.error(f"{flag} must be 1 or more; got {value}")
    glibc = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
             if k in os.environ}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), glibc settings: {glibc or 'default'}\n")
    print("| model | B | timing | np ms | floor ms | privgrad ms | x floor |\n|---|---|---|---|---|---|---|")
    for name in models:
        for how, ms in measure(name, args.batch, args.rounds, args.block).items():
            label = how if how == "interleaved" else f"blocks of {args.block}"
            print(f"| {name} | {args.batch} | {label} | {ms['nonprivate']:.1f} | {ms['floor']:.1f} | "
                  f"{ms['privgrad']:.1f} | {ms['privgrad'] / ms['floor']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
