"""Where a private step's fixed cost goes: microseconds per stage of privgrad's step.

    python benchmarks/fixed_cost.py                       # the MLP at batch 64 and 256, 1 thread
    python benchmarks/fixed_cost.py --models mlp,embedding --batches 256 --steps 600
    python benchmarks/fixed_cost.py --models mlp,bag --batches 64 --also privgrad-bandmf4,privgrad-blt4
    python benchmarks/fixed_cost.py --models toy --batches 4 --steps 2000   # the fixed cost, warm

Each stage of privgrad's step (the table ``STAGES`` below: the hooks, the capture, the norms, the
clip factors, the weighted sums, the noise, the write into ``p.grad``, the guards) is timed by a
wrapper around the function that does it, in *CPU time of the calling thread*
(``time.thread_time``), exclusive of the stages it calls. CPU time, with PyTorch on one thread
(``--threads``), is what another process on a shared machine does not inflate: a wall clock counts
the time the process waits for a core, a thread's CPU time does not. The step runs as
``reference_models.prepare`` builds it (forward, backward, clip and noise, optimizer step on a
fixed batch), interleaved with the non-private step and the floor (non-private plus one
``normal_`` per parameter); every number is a median over ``--steps`` steps.

``privgrad - floor`` is what privgrad adds over the noise any DP-SGD step must draw; the rows
name where it goes. ``model`` rows are work the non-private step does too (its input gradients,
its weight gradients as the weighted sums' products), ``noise`` is work the floor does too
(``normal_``, the add into the gradient).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import parse_models, prepare  # noqa: E402

#: (module, owner, attribute, stage): each wrapped function's CPU time (minus the wrapped
#: functions it calls) is added to its stage.
STAGES = (
    ("privgrad.engine.capture", "Recorder", "_forward_starts", "hooks: forward"),
    ("privgrad.engine.capture", "Recorder", "_forward_hook", "hooks: forward"),
    ("privgrad.engine.capture", None, "input_only", "hooks: forward (rule backward node)"),
    ("privgrad.engine.capture", "Recorder", "_grad_hook", "hooks: tensor (output gradients)"),
    ("privgrad.engine.capture", "Recorder", "_backward_end", "hooks: end of backward"),
    ("privgrad.engine.outputs", "_RuleBackward", "backward", "hooks: rule backward glue"),
    ("privgrad.layers.linear", None, "_linear_input_grad", "model: input gradients"),
    ("privgrad.engine.guard", "StateGuard", "_enter", "guards: state"),
    ("privgrad.engine.guard", "StateGuard", "_leave", "guards: state"),
    ("privgrad.engine.guard", "StateGuard", "after_backward", "guards: state"),
    ("privgrad.engine.guard", "StateGuard", "after_step", "guards: state"),
    ("privgrad.engine.guard", "StateGuard", "check_clean", "guards: state"),
    ("privgrad.training_hooks", "TrainingHooks", "_forward_starts", "guards: forward start"),
    ("privgrad.engine.rows", "DrawnRows", "add", "guards: rows"),
    ("privgrad.engine.rows", "DrawnRows", "release", "guards: rows"),
    ("privgrad.settings", None, "check_ownership", "guards: ownership"),
    ("privgrad.training_hooks", "TrainingHooks", "_on_backward", "capture: hand-over"),
    ("privgrad.training_hooks", "TrainingHooks", "_add_backward", "capture: hand-over"),
    ("privgrad.training_hooks", "TrainingHooks", "_hide_raw_gradients", "capture: hand-over"),
    ("privgrad.engine.batch", "BackwardBatch", "__init__", "norms: plan"),
    ("privgrad.layers.linear", "LinearRule", "ghost_norms_sq", "norms: kernels"),
    ("privgrad.layers.linear", "LinearRule", "per_sample_gradients", "norms: kernels"),
    ("privgrad.layers.embedding", "EmbeddingRule", "ghost_norms_sq", "norms: kernels"),
    ("privgrad.layers.embedding", "EmbeddingRule", "per_sample_gradients", "norms: kernels"),
    ("privgrad.engine.clipped_sum", None, "flat_clip", "clip factors"),
    ("privgrad.engine.clipped_sum", "ClippedSum", "add", "weighted sums: accumulate"),
    ("privgrad.engine.batch", "BackwardBatch", "weighted_sums", "weighted sums: plan"),
    ("privgrad.layers.linear", "LinearRule", "weighted_sum", "model: weighted sums' products"),
    ("privgrad.layers.embedding", "EmbeddingRule", "weighted_sum", "model: weighted sums' products"),
    ("privgrad.layers.embedding", "EmbeddingRule", "sparse_weighted_sum",
     "model: weighted sums' products"),
    ("privgrad.training_hooks", "TrainingHooks", "_before_step", "step: checks, p.grad"),
    ("privgrad.training_hooks", None, "noisy_gradients", "release: write (sums into the noise)"),
    ("privgrad.privatize.noise", "TorchGaussian", "sample_many", "release: noise buffers"),
    ("privgrad.privatize.noise", "TorchGaussian", "fill", "noise: normal_"),
    ("privgrad.accounting.accountant", "Accountant", "compose", "step: accounting"),
)


class StageClock:
    """Wraps the functions of ``STAGES`` (before the engine is attached, so that its hooks are
    the wrappers) and adds up each stage's exclusive CPU time."""

    def __init__(self):
        self.now: dict[str, float] = collections.defaultdict(float)
        self._open: list[float] = []
        self._undo: list[tuple[object, str, object]] = []

    def install(self) -> None:
        import importlib

        for module_name, owner_name, attribute, stage in STAGES:
            module = importlib.import_module(module_name)
            owner = module if owner_name is None else getattr(module, owner_name, None)
            raw = getattr(owner, "__dict__", {}).get(attribute)
            if raw is None:  # a stage another version of privgrad does not have
                continue
            static = isinstance(raw, staticmethod)
            fn = raw.__func__ if static else raw
            wrapped = self._timed(fn, stage)
            self._undo.append((owner, attribute, raw))
            setattr(owner, attribute, staticmethod(wrapped) if static else wrapped)

    def uninstall(self) -> None:
        for owner, attribute, raw in reversed(self._undo):
            setattr(owner, attribute, raw)
        self._undo.clear()

    def _timed(self, fn, stage: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.thread_time()
            self._open.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                inner = self._open.pop()
                self.now[stage] += spent - inner
                if self._open:
                    self._open[-1] += spent
        return timed


def measure(name: str, batch: int, steps: int, clock: StageClock, also=()) -> dict:
    """Median CPU microseconds per step of each stage and of the three steps (and of the
    privgrad variants ``also``, interleaved with them; their ``x``: median of the per-step
    ratios to privgrad's step)."""
    built = {}
    for variant in ("nonprivate", "floor", "privgrad", *also):
        torch.manual_seed(0)
        built[variant] = prepare(name, batch, variant).step
    for step in built.values():
        for _ in range(5):
            step()
    totals = collections.defaultdict(list)
    stages = collections.defaultdict(list)
    for _ in range(steps):
        for variant, step in built.items():
            clock.now.clear()
            start = time.thread_time()
            step()
            totals[variant].append((time.thread_time() - start) * 1e6)
            if variant == "privgrad":
                for stage, seconds in clock.now.items():
                    stages[stage].append(seconds * 1e6)
    over = statistics.median(a - b for a, b in zip(totals["privgrad"], totals["floor"]))
    x = {k: statistics.median(a / b for a, b in zip(totals[k], totals["privgrad"]))
         for k in (*also, "floor")}
    x["floor"] = 1 / x["floor"]  # privgrad / floor
    return {"totals": {k: statistics.median(v) for k, v in totals.items()}, "over": over,
            "x": x, "stages": {k: statistics.median(v) for k, v in stages.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--also", default="", help="privgrad variants to time alongside, e.g. "
                    "privgrad-bandmf4,privgrad-bandmf16,privgrad-blt4")
    args = ap.parse_args()
    also = tuple(v for v in args.also.split(",") if v)
    wrong = [v for v in also if not v.startswith("privgrad-")]
    if wrong:
        ap.error(f"--also must name privgrad variants (privgrad-...); got {','.join(wrong)}")
    parse_models(ap, args.models, extra=("toy",))
    if args.steps < 1:
        ap.error(f"--steps must be 1 or more; got {args.steps}")
    torch.set_num_threads(args.threads)
    clock = StageClock()
    clock.install()
    print(f"# privgrad's fixed cost, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__} "
          f"({args.threads} thread), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f"\n# CPU microseconds of the calling thread, medians over {args.steps} steps\n")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(name, batch, args.steps, clock, also)
            t = r["totals"]
            print(f"{name} B={batch}: non-private {t['nonprivate']:.0f} us, floor "
                  f"{t['floor']:.0f} us, privgrad {t['privgrad']:.0f} us (x{r['x']['floor']:.2f} "
                  f"floor), privgrad - floor {r['over']:+.0f} us" + "".join(
                      f"; {v} {t[v]:.0f} us (x{r['x'][v]:.3f} privgrad)" for v in also) + "\n")
            print("| stage | us |\n|---|---|")
            for stage, us in sorted(r["stages"].items(), key=lambda kv: -kv[1]):
                print(f"| {stage} | {us:.0f} |")
            print(f"| (all stages) | {sum(r['stages'].values()):.0f} |\n", flush=True)
    clock.uninstall()


if __name__ == "__main__":
    main()
