"""Milliseconds per training step: non-private, the noise floor, privgrad and Opacus 1.6.0.

    python benchmarks/step_time.py                      # the whole table of issue 4
    python benchmarks/step_time.py --models mlp --batches 64 --min-time 2
    python benchmarks/step_time.py --in-process --rounds 7   # one process, variants interleaved

Two modes; the table's second header line says which one printed it. ``--in-process`` builds
every variant once in one process and alternates them step by step (``interleaved.py``: medians
of per-round ratios privgrad / floor, / non-private, / Opacus's fastest mode, and privgrad's
own cost over the floor in ms). The default mode, described below, runs each configuration in
a fresh process and reports more (memory, page faults, noise draws, every Opacus mode).
The models and the variants' steps are in ``reference_models.py``.

One step is forward + backward + (clip + noise) + optimizer step on a fixed batch, so every
column does the same work; each cell is the median over at least ``--min-steps`` steps and
``--min-time`` seconds after one or two warm-up steps (at least 3 steps and about a minute for
configurations slower than that). Each configuration runs in a fresh subprocess (no allocator or
thread-pool state carried over); the non-private baseline runs first and last for every
model and batch size, and the spread of the two exposes drift caused by other load on the
machine. With ``--rounds N`` the non-private, floor and privgrad runs are repeated N times,
interleaved (np, floor, privgrad, np, ...; Opacus once), each cell is the median over the
rounds and the ratios to ``np`` and ``floor`` are medians of the per-round ratios, each from
runs a few seconds apart: on a machine whose speed drifts (a shared VM) that is far steadier
than one run of each. Columns:

- ``np`` / ``np2``: non-private step (first and last run), median ms;
- ``floor``: non-private step plus one ``torch.normal_`` draw per parameter, added to ``p.grad``
  (what any DP-SGD step must at least cost: fresh noise on every parameter);
- ``privgrad``: ``privgrad.PrivacyEngine`` with its defaults (``grad_sample_mode="auto"``);
  the variant ``privgrad-mkl`` (in ``--variants``, reported in the notes) runs the rules' own
  float32 products on torch's BLAS instead of oneDNN (see ``privgrad/layers/kernels.py``);
- ``hooks``, ``functorch``, ``ew``, ``ghost``: Opacus 1.6.0's ``grad_sample_mode``s;
- ratios of privgrad to the mean non-private time, to the floor and to Opacus's fastest mode;
- ``noise``: ms to draw one step's noise for all parameters, privgrad's source versus Opacus's
  ``_generate_noise``, measured in the floor's subprocess;
- ``MB``: peak resident set size of the training loop (``VmHWM`` after resetting it, so the
  import of torch counts but the set-up's transients do not), non-private and privgrad.

The notes under the table give, per configuration, the minor page faults per step and the
kernel's share of the CPU time (non-private and privgrad). ``--malloc-tuned`` runs every
configuration, all columns alike, with glibc keeping freed memory instead of returning it to
the kernel: on a virtual machine, where a page fault costs microseconds, that separates the
allocator's cost from the arithmetic. ``--omp-spin COUNT`` runs every configuration, all columns
alike, with ``GOMP_SPINCOUNT=COUNT``: PyTorch's idle OpenMP threads spin that many times after a
parallel region before they sleep (default 300,000, several milliseconds), and while they spin
they take a core from privgrad's noise streams (see docs/performance.md).

Opacus modes that would materialise per-sample gradients larger than ``--max-psg-gb`` are
skipped (printed as ``skip``) so that the run cannot exhaust a shared machine's memory.
Needs the ``bench`` extra (``pip install -e .[bench] -c constraints.txt``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the models and steps every benchmark shares; the names other scripts import from here
import interleaved  # the in-process mode
from reference_models import (  # noqa: F401
    CLIP, CLIPPING_VARIANTS, LR, MECHANISM_STEPS, MECHANISM_VARIANTS, MODELS, OPACUS_MODES,
    SIGMA, Transformer, build, drawn_batch, engine_methods, opacus_skip, parse_models, prepare,
    psg_gb)


# -- one configuration, in its own process ------------------------------------------------------
def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def noise_times(params: list[torch.Tensor]) -> dict[str, float]:
    """Median ms to draw one step's noise: plain torch, privgrad's source, Opacus's."""
    from privgrad.privatize import TorchGaussian

    out = {}
    source = TorchGaussian()
    draws = {
        "torch": lambda: [torch.empty_like(p).normal_(0, SIGMA * CLIP) for p in params],
        "privgrad": lambda: [source.sample(p, SIGMA * CLIP) for p in params],
    }
    try:
        from opacus.optimizers.optimizer import _generate_noise

        draws["opacus"] = lambda: [_generate_noise(SIGMA * CLIP, p) for p in params]
    except ImportError:
        pass
    for name, draw in draws.items():
        draw()
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            draw()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts) * 1e3
    return out


def worker(name: str, batch: int, variant: str, min_time: float, min_steps: int) -> dict:
    import privgrad  # noqa: F401 - every variant loads the same libraries, so RSS compares
    try:
        import opacus  # noqa: F401
    except ImportError:
        pass
    torch.manual_seed(0)
    prepared = prepare(name, batch, variant)
    step, engine = prepared.step, prepared.engine
    extra = {"methods": None} if engine is not None else {}
    if variant == "floor":
        extra["noise_ms"] = noise_times(prepared.params)

    t0 = time.perf_counter()
    step()  # warm-up (allocations, lazy initialisation, first-call dispatch; compilation)
    extra["first_step_s"] = round(time.perf_counter() - t0, 1)
    if time.perf_counter() - t0 < 2.0 or variant == "privgrad-compile":
        step()
    base = rss_mb("VmRSS")
    reset_peak()
    before = resource.getrusage(resource.RUSAGE_SELF)
    times, start = [], time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if len(times) >= 200 or (len(times) >= 3 and elapsed > 60.0):
            break  # slow configurations: at least 3 timed steps, about a minute
    after = resource.getrusage(resource.RUSAGE_SELF)
    if engine is not None:
        extra["methods"] = sorted(set(engine_methods(engine)))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"ms": statistics.median(times) * 1e3, "steps": len(times), "peak_mb": rss_mb("VmHWM"),
            "base_mb": base, "faults": (after.ru_minflt - before.ru_minflt) / len(times),
            "kernel_share": (after.ru_stime - before.ru_stime) / cpu if cpu else math.nan, **extra}


# -- the driver ---------------------------------------------------------------------------------
# glibc returns freed memory to the kernel eagerly (blocks of 32 MB and more are always fresh
# mappings, and the heap top is trimmed), so every step pays page faults for its large tensors;
# on a virtual machine a fault costs microseconds. These settings keep freed memory for reuse.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**40), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def run_env(args) -> dict[str, str]:
    """Environment settings every configuration of this run gets alike (``--malloc-tuned``,
    ``--omp-spin``): read by glibc and libgomp when a process starts, so only a fresh
    subprocess can have them."""
    env = dict(TUNED_MALLOC) if args.malloc_tuned else {}
    if args.omp_spin is not None:
        env["GOMP_SPINCOUNT"] = str(args.omp_spin)
    return env


def run(name: str, batch: int, variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, str(batch), variant, "--threads",
           str(args.threads), "--min-time", str(args.min_time), "--min-steps", str(args.min_steps)]
    env = {**os.environ, **run_env(args)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {args.timeout}s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:120]}
    return json.loads(lines[-1])


def fmt(r: dict | None, key: str = "ms") -> str:
    if r is None:
        return "-"
    if "skip" in r:
        return "skip"
    if "error" in r:
        return "fail"
    return f"{r[key]:.1f}" if r[key] < 100 else f"{r[key]:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--variants", default="privgrad," + ",".join("opacus-" + m for m in OPACUS_MODES))
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timed steps per run")
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads per run (default: torch's, one per core)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--max-psg-gb", type=float, default=4.0)
    ap.add_argument("--rounds", type=int,
                    help="fresh processes: repeat the np, floor and privgrad runs this many times, "
                         "interleaved (default 1); --in-process: rounds of one step of each "
                         "variant (default 7)")
    ap.add_argument("--in-process", action="store_true",
                    help="one process: build every variant once, then alternate them step by step "
                         "(see interleaved.py)")
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--malloc-tuned", action="store_true",
                    help="run every configuration (all columns alike) with glibc told to keep "
                         "freed memory: " + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items()))
    ap.add_argument("--omp-spin", type=int, metavar="COUNT",
                    help="run every configuration (all columns alike) with GOMP_SPINCOUNT=COUNT: "
                         "how long PyTorch's idle OpenMP threads spin before they sleep")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "BATCH", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.omp_spin is not None and args.omp_spin < 0:
        ap.error(f"--omp-spin must be a count of 0 or more; got {args.omp_spin}")
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds must be 1 or more; got {args.rounds}")
    if not args.worker:
        parse_models(ap, args.models)
    if args.in_process and (args.malloc_tuned or args.omp_spin is not None):
        ap.error("--malloc-tuned and --omp-spin need a fresh process per configuration; got "
                 "--in-process. Drop --in-process, or set the variables before Python starts.")
    torch.set_num_threads(args.threads)
    if args.worker:
        name, batch, variant = args.worker
        print(json.dumps(worker(name, int(batch), variant, args.min_time, args.min_steps)))
        return

    try:
        import opacus
        peer = f"opacus {opacus.__version__}"
    except ImportError:
        peer = "opacus not installed"
    load = os.getloadavg()
    print(f"# privgrad step time, {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} threads), "
          f"{peer}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"allocator: glibc {'tuned (--malloc-tuned)' if args.malloc_tuned else 'default'}, "
          f"OpenMP spin: {'GOMP_SPINCOUNT=%d (--omp-spin)' % args.omp_spin if args.omp_spin is not None else 'default'}")
    variants = [v for v in args.variants.split(",") if v]
    batches = [int(b) for b in args.batches.split(",")]
    if args.in_process:
        results = interleaved.run_table(args.models.split(","), batches, args.rounds or 7,
                                        variants, args.max_psg_gb)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    args.rounds = args.rounds or 1
    print("# mode: fresh processes; ms/step medians; x = privgrad / column; each cell a fresh process\n")
    head = ("| model | B | np | np2 | floor | privgrad | hooks | functorch | ew | ghost | x np | "
            "x floor | x opacus | noise pg/op ms | MB np | MB pg (x) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    results = []
    for name in args.models.split(","):
        for batch in batches:
            rounds = [{k: run(name, batch, variant, args) for k, variant in (
                ("np", "nonprivate"), ("floor", "floor"), ("privgrad", "privgrad"))}
                for _ in range(args.rounds if "privgrad" in variants else 0)]
            r = {"model": name, "batch": batch, **(
                combined(rounds) if rounds else {"np": run(name, batch, "nonprivate", args),
                                                 "floor": run(name, batch, "floor", args)})}
            for v in variants:
                if v == "privgrad" and rounds:
                    continue
                skip = v.startswith("opacus") and opacus_skip(name, batch, v, args.max_psg_gb)
                r[v] = {"skip": skip} if skip else run(name, batch, v, args)
            r["np2"] = run(name, batch, "nonprivate", args)
            results.append(r)
            print(row(r), flush=True)
    print("\nnotes:")
    for r in results:
        for k, v in r.items():
            if isinstance(v, dict) and ("error" in v or "skip" in v):
                print(f"- {r['model']} B={r['batch']} {k}: {v.get('error') or v.get('skip')}")
        pg = r.get("privgrad", {})
        if "faults" in pg and "faults" in r["np"]:
            print(f"- {r['model']} B={r['batch']} page faults per step np / privgrad: "
                  f"{r['np']['faults']:.0f} / {pg['faults']:.0f}; kernel share of CPU time "
                  f"{r['np']['kernel_share']:.0%} / {pg['kernel_share']:.0%}")
        if "ms" in r.get("privgrad-mkl", {}):
            print(f"- {r['model']} B={r['batch']} privgrad with the rules' products on MKL "
                  f"(privgrad-mkl): {r['privgrad-mkl']['ms']:.1f} ms")
        if "ms" in r.get("privgrad-compile", {}):
            c = r["privgrad-compile"]
            eager = f", eager {pg['ms']:.1f} ms (x{c['ms'] / pg['ms']:.2f})" if "ms" in pg else ""
            print(f"- {r['model']} B={r['batch']} privgrad with torch.compile (privgrad-compile): "
                  f"{c['ms']:.1f} ms{eager}; first (compiling) step {c.get('first_step_s')} s")
        if pg.get("methods"):
            print(f"- {r['model']} B={r['batch']} privgrad rules: {', '.join(pg['methods'])}")
        if len(r.get("rounds", ())) > 1:
            print(f"- {r['model']} B={r['batch']} per round (np / floor / privgrad ms, x floor): "
                  + "; ".join(f"{a:.1f} / {b:.1f} / {c:.1f}, {c / b:.2f}" for a, b, c in r["rounds"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


# -- side-by-side A/B of privgrad variants (benchmarks/clipping.py, benchmarks/mechanisms.py) --
def ab_arguments(description: str) -> argparse.Namespace:
    """The arguments of an A/B benchmark of privgrad variants, parsed; prints the run's header."""
    import datetime

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed steps per run")
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    args.malloc_tuned, args.omp_spin = False, None  # run() reads them
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch}, {args.rounds} rounds\n")
    return args


def side_by_side(name: str, variants: tuple[str, ...], args) -> dict:
    """``--rounds`` rounds of every variant back to back, each in a fresh process: the median
    ms per variant and the medians of per-round ratios to ``variants[0]``
    (``{"ms", "ratio"}``), or ``{"errors"}`` of the first round that failed."""
    rounds = []
    for _ in range(args.rounds):
        runs = {v: run(name, args.batch, v, args) for v in variants}
        if not all("ms" in r for r in runs.values()):
            return {"errors": {v: r.get("error") for v, r in runs.items() if "ms" not in r}}
        rounds.append({v: r["ms"] for v, r in runs.items()})
    base = variants[0]
    return {"ms": {v: statistics.median(r[v] for r in rounds) for v in variants},
            "ratio": {v: statistics.median(r[v] / r[base] for r in rounds) for v in variants[1:]}}


def combined(rounds: list[dict]) -> dict:
    """One result per column from ``--rounds`` interleaved runs: each run's median step time
    is replaced by the median over the rounds (the other fields are the middle round's), and
    the ratios of privgrad to np and to the floor by the medians of the per-round ratios."""
    out = {}
    ok = [rd for rd in rounds if all("ms" in rd[k] for k in ("np", "floor", "privgrad"))]
    for k in ("np", "floor", "privgrad"):
        runs = [rd[k] for rd in (ok or rounds)]
        good = [x for x in runs if "ms" in x]
        if not good:
            out[k] = runs[0]
            continue
        out[k] = {**sorted(good, key=lambda x: x["ms"])[len(good) // 2],
                  "ms": statistics.median(x["ms"] for x in good)}
    if ok:
        out["ratios"] = {
            "np": statistics.median(rd["privgrad"]["ms"] / rd["np"]["ms"] for rd in ok),
            "floor": statistics.median(rd["privgrad"]["ms"] / rd["floor"]["ms"] for rd in ok)}
        out["rounds"] = [(rd["np"]["ms"], rd["floor"]["ms"], rd["privgrad"]["ms"]) for rd in ok]
    return out


def row(r: dict) -> str:
    def ms(k):
        v = r.get(k)
        return v["ms"] if v and "ms" in v else math.nan

    base = statistics.mean([m for m in (ms("np"), ms("np2")) if not math.isnan(m)] or [math.nan])
    opacus = [ms("opacus-" + m) for m in OPACUS_MODES]
    best = min([m for m in opacus if not math.isnan(m)], default=math.nan)
    pg = ms("privgrad")
    noise = r["floor"].get("noise_ms", {}) if "ms" in r["floor"] else {}
    mem_np = r["np"].get("peak_mb", math.nan) if "ms" in r["np"] else math.nan
    mem_pg = r.get("privgrad", {}).get("peak_mb", math.nan)
    cells = [r["model"], str(r["batch"]), fmt(r["np"]), fmt(r["np2"]), fmt(r["floor"]),
             fmt(r.get("privgrad"))] + [fmt(r.get("opacus-" + m)) for m in OPACUS_MODES] + [
        f"{r['ratios']['np'] if 'ratios' in r else pg / base:.2f}",
        f"{r['ratios']['floor'] if 'ratios' in r else pg / ms('floor'):.2f}", f"{pg / best:.2f}",
        f"{noise.get('privgrad', math.nan):.1f} / {noise.get('opacus', math.nan):.1f}",
        f"{mem_np:.0f}", f"{mem_pg:.0f} ({mem_pg / mem_np:.2f})"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
