"""What the privacy guards cost: privgrad's step with and without them, and the first step's
self-check, on the six reference models of ``step_time.py``, measured side by side in one run.

    python benchmarks/guards.py                         # batch 64, every model
    python benchmarks/guards.py --models mlp,cnn --batch 256 --rounds 9

Columns (milliseconds are medians; ratios are medians of per-round ratios, each round running the
two variants back to back on the same fixed batch):

- ``guarded``: the private step as shipped: the state guard's hooks and version reads at every
  module call, forward and backward end and step (``privgrad.engine.guard``), the check of the
  trainable parameters at each forward pass, the rows-against-drawn-batch check
  (``privgrad.engine.rows``), and the raw gradients hidden after backward;
- ``bare``: the same engine with those guards taken off (its hooks removed, the checks replaced by
  no-ops), after the same first step;
- ``guards``: ``guarded / bare - 1``, the guards' share of a step (the target is under 1%); on a
  shared 2-core VM this A/B moves by several percent from round to round, so two more columns
  measure the same thing directly:
- ``guard us``: microseconds per step spent inside the guards' own code (every hook, check and
  callback of one recorded step, replayed through the real methods), plus their hooks' dispatch
  (the calls counted, times the cost of one extra hook on a module call, measured here);
- ``share``: ``guard us`` over the ``guarded`` step;
- ``first``: the first step of a fresh engine, which runs the self-check of
  ``privgrad.engine.selfcheck`` (autograd's parameter gradients and one unclipped sum), against
  ``first-bare``, the first step of a fresh engine whose self-check is off, both after a warm-up
  engine, in units of one steady step: ``check = (first - first-bare) / guarded`` (target: under
  one extra step).

Nothing is asserted: the table is committed to docs/performance.md with the machine and date.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import parse_models  # noqa: E402
from step_time import CLIP, LR, MODELS, SIGMA, build, drawn_batch  # noqa: E402


def attach(name: str, batch: int, check: bool = True):
    """A fresh model and engine on the model's fixed batch; ``check=False`` turns the
    first-step self-check off."""
    from privgrad import PrivacyEngine

    torch.manual_seed(0)
    model, x, y = build(name, batch, "privgrad")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                        noise_multiplier=SIGMA, max_grad_norm=CLIP)
    if not check:
        engine._checking = False
        engine._checked = frozenset(p for p in model.parameters() if p.requires_grad)
    criterion = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        drawn_batch(engine, batch)
        criterion(model(x), y).backward()
        optimizer.step()

    return engine, step


def take_off_guards(engine) -> None:
    """The engine without its guards: what ``bare`` measures."""
    engine._guard.detach()
    engine._guard.after_backward = engine._guard.after_step = lambda: None
    engine._guard.check_clean = lambda: None
    engine._forward_starts = lambda: None
    engine._rows.add = lambda tags, rows: None
    engine._rows.release = lambda: None


GUARD_CODE = (("privgrad.engine.guard", "StateGuard",
                ("_enter", "_leave", "_refuse_writer", "after_backward", "after_step",
                 "check_clean")),
               ("privgrad.engine.rows", "DrawnRows", ("add", "release")),
               ("privgrad.privacy_engine", "PrivacyEngine", ("_hide_raw_gradients",)))
HOOKS = ("_enter", "_leave", "_refuse_writer")  # called by a module call's hook dispatch


def instrumented(name: str, batch: int, repeats: int = 2000) -> tuple[float, float]:
    """``(microseconds, hook calls)`` per step inside the guards' code.

    One real step runs with the guards' entry points wrapped, which records each call with its
    arguments (the drawn batch's own bookkeeping included); the recorded sequence is then
    replayed ``repeats`` times through the real, unwrapped methods, and the replay loop's own
    cost (the same calls to empty functions) is subtracted. So the number is the guards' code
    as one step runs it, without a timer around every call inflating it."""
    import importlib

    calls, originals, depth = [], [], [0]

    def recorder(owner_name, method_name, method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            if depth[0] == 0:
                calls.append((owner_name, method_name, self, args, kwargs))
            depth[0] += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return run

    owners = {}
    for module, cls, methods in GUARD_CODE:
        owner = getattr(importlib.import_module(module), cls)
        owners[cls] = owner
        for m in methods:
            originals.append((owner, m, getattr(owner, m)))
            setattr(owner, m, recorder(cls, m, getattr(owner, m)))
    try:
        engine, step = attach(name, batch)
        step(), step()
        calls.clear()
        step()
    finally:
        for owner, m, method in originals:
            setattr(owner, m, method)
    drawn = engine._rows.drawn
    sequence = []
    for cls, m, obj, args, kwargs in calls:
        if (cls, m) == ("DrawnRows", "add"):  # tagged with the replayed delivery, as in a step
            rows, add = args[1], owners[cls].add
            sequence.append((lambda obj=obj, rows=rows: add(obj, {drawn.delivered}, rows), (), {}))
        else:
            sequence.append((getattr(owners[cls], m), (obj, *args), kwargs))
    delivery = [(drawn.queue, (batch,), {}), (drawn.deliver, (), {})]
    sequence = delivery + sequence
    empty = [(_nothing, a, k) for _, a, k in sequence]

    def replay(seq):
        t0 = time.perf_counter()
        for _ in range(repeats):
            for fn, a, k in seq:
                fn(*a, **k)
        return time.perf_counter() - t0

    real = statistics.median(replay(sequence) for _ in range(5))
    loop = statistics.median(replay(empty) for _ in range(5))
    hooks = sum(1 for cls, m, *_ in calls if m in HOOKS)
    return max(0.0, real - loop) / repeats * 1e6, hooks


def _nothing(*args, **kwargs):
    return None


def hook_dispatch_us(repeats: int = 20000) -> float:
    """Microseconds one more forward hook adds to a module call (PyTorch's dispatch of it)."""
    layer = nn.Identity()
    x = torch.zeros(1)
    layer.register_forward_hook(lambda m, a, o: None)  # the slow call path in both variants

    def per_call():
        t0 = time.perf_counter()
        for _ in range(repeats):
            layer(x)
        return (time.perf_counter() - t0) / repeats * 1e6

    base = statistics.median(per_call() for _ in range(5))
    layer.register_forward_hook(lambda m, a, o: None)
    return max(0.0, statistics.median(per_call() for _ in range(5)) - base)


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def measure(name: str, batch: int, rounds: int, steps: int) -> dict:
    _, warm = attach(name, batch)
    warm()
    warm()  # lazy initialisation, first-call dispatch, allocator: paid once per process
    first, first_bare = [], []
    for _ in range(rounds):
        _, fresh = attach(name, batch, check=True)
        first.append(timed(fresh))
        _, fresh = attach(name, batch, check=False)
        first_bare.append(timed(fresh))
    guarded_engine, guarded = attach(name, batch)
    bare_engine, bare = attach(name, batch)
    guarded(), bare()  # the first (checked) steps
    take_off_guards(bare_engine)
    guarded(), bare()
    per_round, g_ms, b_ms = [], [], []
    for _ in range(rounds):
        g = statistics.median(timed(guarded) for _ in range(steps))
        b = statistics.median(timed(bare) for _ in range(steps))
        g_ms.append(g)
        b_ms.append(b)
        per_round.append(g / b - 1)
    steady = statistics.median(g_ms)
    inside, hook_calls = instrumented(name, batch)
    guard_us = inside + hook_calls * DISPATCH_US[0]
    return {"guard_us": guard_us, "share": guard_us / (steady * 1e3), "guarded": steady, "bare": statistics.median(b_ms),
            "guards": statistics.median(per_round), "rounds": per_round,
            "first": statistics.median(first), "first_bare": statistics.median(first_bare),
            "check": (statistics.median(first) - statistics.median(first_bare)) / steady}


DISPATCH_US = [0.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    args = parser.parse_args()
    models = parse_models(parser, args.models)
    for flag in ("batch", "rounds", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be 1 or more; got {getattr(args, flag)}")
    print(f"# guards, batch {args.batch}, {args.rounds} rounds x {args.steps} steps; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    DISPATCH_US[0] = hook_dispatch_us()
    print(f"# one extra forward hook on a module call: {DISPATCH_US[0]:.2f} us")
    print("| model | guarded ms | bare ms | guards | guard us | share | first ms | first-bare ms "
          "| check (steps) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in models:
        r = measure(name, args.batch, args.rounds, args.steps)
        print(f"| {name} | {r['guarded']:.2f} | {r['bare']:.2f} | {100 * r['guards']:+.1f}% "
              f"| {r['guard_us']:.0f} | {100 * r['share']:.2f}% | {r['first']:.1f} "
              f"| {r['first_bare']:.1f} | {r['check']:.2f} |", flush=True)
        print(f"<!-- {name} per-round guard share: "
              + ", ".join(f"{100 * v:+.1f}%" for v in r["rounds"]) + " -->", flush=True)


if __name__ == "__main__":
    main()
