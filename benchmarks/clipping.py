"""What clipping without tuning costs: privgrad's step with flat, automatic and adaptive clipping
on the six reference models of ``step_time.py``, measured side by side in one run.

    python benchmarks/clipping.py                         # batch 64, every model, 5 rounds
    python benchmarks/clipping.py --models mlp,cnn --batch 256 --rounds 9

Each round runs the three variants back to back, each in a fresh process (``step_time.run``:
the same fixed batch, the same warm-up and timing); the ratios are medians of the per-round
ratios to flat clipping, which is far steadier on a shared machine than one run of each.
Automatic clipping changes the clip factors only (``C / (||g|| + gamma)`` instead of
``min(1, C / ||g||)``); adaptive clipping adds the count of examples within the bound, one
noise draw and the bound's update per step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import step_time  # noqa: E402  (the reference models and the timed worker)

VARIANTS = ("privgrad", "privgrad-automatic", "privgrad-adaptive")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(step_time.MODELS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed steps per run")
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    args.malloc_tuned, args.omp_spin = False, None  # step_time.run reads them
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch}, {args.rounds} rounds\n")
    print("| model | flat ms | automatic ms | adaptive ms | automatic / flat | adaptive / flat |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        rounds = []
        for _ in range(args.rounds):
            runs = {v: step_time.run(name, args.batch, v, args) for v in VARIANTS}
            if all("ms" in r for r in runs.values()):
                rounds.append({v: r["ms"] for v, r in runs.items()})
            else:
                errors = {v: r.get("error") for v, r in runs.items() if "ms" not in r}
                print(f"| {name} | error: {errors} |||||")
                break
        if not rounds:
            continue
        ms = {v: statistics.median(r[v] for r in rounds) for v in VARIANTS}
        ratio = {v: statistics.median(r[v] / r["privgrad"] for r in rounds) for v in VARIANTS[1:]}
        print(f"| {name} | {ms['privgrad']:.1f} | {ms['privgrad-automatic']:.1f} | "
              f"{ms['privgrad-adaptive']:.1f} | {ratio['privgrad-automatic']:.3f} | "
              f"{ratio['privgrad-adaptive']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
