"""What correlated noise costs: privgrad's step with DP-SGD, BandMF (4 and 16 bands) and BLT (4
buffers) on the six reference models of ``step_time.py``, measured side by side in one run.

    python benchmarks/mechanisms.py                       # batch 64, every model, 5 rounds
    python benchmarks/mechanisms.py --models mlp,cnn --batch 256 --rounds 9

Each round runs the variants back to back, each in a fresh process (``step_time.run``: the same
fixed batch, warm-up and timing); the ratios are medians of the per-round ratios to DP-SGD. The
line above the table times, in-process, what correlated noise adds to a step for a
one-million-parameter model: the release with BandMF's and BLT's streaming generators against
DP-SGD's ``noisy_gradients`` (independent draws), and the buffers' memory.

The last columns are the *traffic floor* of each model: the time of the one pass over the noise
state that no implementation of the mechanism can avoid, measured in this process on the
model's parameter count, as a share of the DP-SGD step. BandMF's ``w_t`` is a combination of
its last ``b - 1`` outputs, so every step reads ``b - 1`` model-sized buffers (timed: one
``addmv`` over them, BLAS's best kernel for exactly that sum); BLT reads its ``k`` buffers and
writes them back (timed: one ``addmv`` and one in-place ``addcmul``). Where that share alone is
above the target (5% of a step), no kernel or reordering can meet it on this machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import step_time  # (the reference models and the timed worker)

VARIANTS = ("privgrad", *step_time.MECHANISM_VARIANTS)


def times_ms(fn, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def own_costs(size: int = 1_000_000, repeats: int = 50) -> dict[str, tuple[float, float]]:
    """``{name: (ms per release, extra MiB)}`` of one release of a ``size``-parameter model."""
    from privgrad.mechanism_run import MechanismRun
    from privgrad.mechanisms import BLT, BandMF
    from privgrad.privatize import TorchGaussian, noisy_gradients

    params = [torch.nn.Parameter(torch.zeros(size))]
    sums = {params[0]: torch.randn(size)}
    out = {}
    source = TorchGaussian(seed=0)

    def timed(fn) -> float:
        return statistics.fmean(times_ms(fn, repeats))

    out["dp-sgd"] = (timed(lambda: noisy_gradients(params, sums, noise_std=1.0, normaliser=64.0,
                                                   noise=source)), 0.0)
    for name, mechanism in (("bandmf 4", BandMF(num_bands=4)), ("bandmf 16", BandMF(num_bands=16)),
                            ("blt 4", BLT(num_buffers=4, min_sep=16))):
        run = MechanismRun(mechanism, 10 * repeats + 10, params, TorchGaussian(seed=0))
        row = iter(range(10 * repeats + 10))
        ms = timed(lambda run=run, row=row: run.release(sums, row=next(row), noise_std=1.0,
                                                        normaliser=64.0))
        buffers = sum(t.numel() * t.element_size() for s in run.noise.streams.values()
                      for t in (s._state(),))
        out[name] = (ms, buffers / 2**20)
    return out


def traffic_floor(size: int, repeats: int = 21) -> dict[str, float]:
    """``{name: ms}``: the unavoidable pass over the noise state of a ``size``-parameter model
    (median of ``repeats``), for BandMF with 4 and 16 bands and BLT with 4 buffers."""

    def timed(fn) -> float:
        return statistics.median(times_ms(fn, repeats))

    z, out = torch.randn(size), torch.empty(size)
    floors = {}
    for name, rows in (("bandmf4", 3), ("bandmf16", 15)):
        history, coefficients = torch.randn(rows, size), torch.randn(rows)
        floors[name] = timed(lambda h=history, c=coefficients: torch.addmv(z, h.t(), c, out=out))
        del history
    buffers, decays = torch.randn(4, size), torch.rand(4, 1)
    rows, scales = z.expand_as(buffers), decays.expand_as(buffers)

    def blt() -> None:
        torch.addmv(z, buffers.t(), decays.view(-1), out=out)
        torch.addcmul(rows, buffers, scales, out=buffers)  # u <- decay * u + z, one pass

    floors["blt4"] = timed(blt)
    return floors


def main() -> None:
    args = step_time.ab_arguments(__doc__.split("\n\n")[0])
    costs = own_costs()
    print("release of a 1M-parameter model, in-process: " + "; ".join(
        f"{k} {ms:.2f} ms" + (f" (+{mib:.0f} MiB)" if mib else "") for k, (ms, mib) in costs.items())
        + "\n")
    names = [v.removeprefix("privgrad-") for v in VARIANTS[1:]]
    print("| model | DP-SGD ms | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} / DP-SGD" for n in names) + " | "
          + " | ".join(f"{n} floor / DP-SGD" for n in names) + " |")
    print("|---" * (2 + 3 * len(names)) + "|")
    models = args.models.split(",")
    floors = {}  # timed first, in this process alone (no model's run has touched its memory)
    for name in models:
        model = step_time.build(name, args.batch, "privgrad")[0]
        floors[name] = traffic_floor(sum(p.numel() for p in model.parameters()
                                         if p.requires_grad))
        del model
    for name in models:
        r = step_time.side_by_side(name, VARIANTS, args)
        if "errors" in r:
            print(f"| {name} | error: {r['errors']} |" + "|" * (3 * len(names)))
            continue
        floor = floors[name]
        print(f"| {name} | " + " | ".join(f"{r['ms'][v]:.1f}" for v in VARIANTS) + " | "
              + " | ".join(f"{r['ratio'][v]:.3f}" for v in VARIANTS[1:]) + " | "
              + " | ".join(f"{floor[n] / r['ms']['privgrad']:.3f}" for n in names) + " |",
              flush=True)

if __name__ == "__main__":
    main()
