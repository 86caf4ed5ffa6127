"""What clipping without tuning costs: privgrad's step with flat, automatic and adaptive clipping
on the six reference models of ``step_time.py``, measured side by side in one run.

    python benchmarks/clipping.py                         # batch 64, every model, 5 rounds
    python benchmarks/clipping.py --models mlp,cnn --batch 256 --rounds 9

Each round runs the three variants back to back, each in a fresh process (``step_time.run``:
the same fixed batch, the same warm-up and timing); the ratios are medians of the per-round
ratios to flat clipping, which is far steadier on a shared machine than one run of each. The
line above the table times, in-process, the code each mode adds to a step (the clip factors;
adaptive clipping's count, noise draw and update), which the whole-step A/B cannot resolve.
Automatic clipping changes the clip factors only (``C / (||g|| + gamma)`` instead of
``min(1, C / ||g||)``); adaptive clipping adds the count of examples within the bound, one
noise draw and the bound's update per step.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import step_time  # noqa: E402  (the reference models and the timed worker)

VARIANTS = ("privgrad", "privgrad-automatic", "privgrad-adaptive")


def own_costs(batch: int, params: int = 4, repeats: int = 2000) -> dict[str, float]:
    """Microseconds per step of the code each mode adds, timed in this process (the A/B of whole
    steps moves by 5-10% per round on a shared VM, more than these costs): the clip factors from
    ``params`` parameters' squared norms (flat, automatic), and adaptive clipping's count, its
    noise draw and the bound's update."""
    from privgrad.privatize import TorchGaussian, automatic_clip, flat_clip
    from privgrad.privatize.adaptive import QuantileBound

    norms_sq = {torch.nn.Parameter(torch.zeros(1)): torch.rand(batch) for _ in range(params)}
    bound, noise = QuantileBound(1.0, 0.5, 0.2, batch / 20), TorchGaussian(seed=0)

    def adaptive_step():
        count = torch.tensor([batch / 2, batch], dtype=torch.float64)
        bound.update(bound.release(count[:-1], count[-1], noise), batch, bound.bound)

    out = {}
    for name, fn in (("flat factors", lambda: flat_clip(norms_sq, 1.0, batch)),
                     ("automatic factors", lambda: automatic_clip(norms_sq, 1.0, 0.01, batch)),
                     ("adaptive count and update", adaptive_step)):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - start) / repeats * 1e6
    return out


def main() -> None:
    args = step_time.ab_arguments(__doc__.split("\n\n")[0])
    costs = own_costs(args.batch)
    print("own code per step, timed in-process: " + "; ".join(
        f"{k} {v:.0f} us" for k, v in costs.items()) + "\n")
    print("| model | flat ms | automatic ms | adaptive ms | automatic / flat | adaptive / flat |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = step_time.side_by_side(name, VARIANTS, args)
        if "errors" in r:
            print(f"| {name} | error: {r['errors']} |||||")
            continue
        ms, ratio = r["ms"], r["ratio"]
        print(f"| {name} | {ms['privgrad']:.1f} | {ms['privgrad-automatic']:.1f} | "
              f"{ms['privgrad-adaptive']:.1f} | {ratio['privgrad-automatic']:.3f} | "
              f"{ratio['privgrad-adaptive']:.3f} |", flush=True)

if __name__ == "__main__":
    main()
