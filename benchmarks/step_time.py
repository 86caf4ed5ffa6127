"""Milliseconds per training step: non-private, the noise floor, privgrad and Opacus 1.6.0.

    python benchmarks/step_time.py                      # the whole table of issue 4
    python benchmarks/step_time.py --models mlp --batches 64 --min-time 2

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
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "cnn", "transformer", "lstm", "embedding", "bag")
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")
SIGMA, CLIP, LR = 1.0, 1.0, 0.01
#: variants of privgrad with another clipping mode (benchmarks/clipping.py runs them)
CLIPPING_VARIANTS = ("privgrad-automatic", "privgrad-adaptive")
#: variants of privgrad with correlated noise (benchmarks/mechanisms.py runs them): the number of
#: bands or buffers; each plans its noise for MECHANISM_STEPS steps
MECHANISM_VARIANTS = {"privgrad-bandmf4": ("bandmf", 4), "privgrad-bandmf16": ("bandmf", 16),
                      "privgrad-blt4": ("blt", 4)}
MECHANISM_STEPS = 10_000


# -- the five models of issue 4 (embedding models in two variants) ------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def cnn() -> nn.Module:
    layers, c_in = [], 3
    for i, c in enumerate((32, 64, 64, 128)):
        pool = nn.AvgPool2d(2) if i < 3 else nn.AdaptiveAvgPool2d(1)
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU(), pool]
        c_in = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128, 10))


class Block(nn.Module):
    """Pre-norm encoder block of plain Linear and LayerNorm layers (heads h, width d)."""

    def __init__(self, d=256, heads=4, ff=1024):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, vocab=10_000, seq=128, d=256, layers=2, classes=2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, idx):
        # contiguous: Opacus's ghost norm for embeddings calls .view on the indices, which
        # fails on an expanded tensor (privgrad takes either)
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx).contiguous()
        x = self.blocks(self.tok(idx) + self.pos(positions))
        return self.head(self.ln(x).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, lstm_type=nn.LSTM, vocab=10_000, d=128, hidden=256, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = lstm_type(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, idx):
        out, _ = self.lstm(self.emb(idx))
        return self.head(out[:, -1])


class BagOfEmbeddings(nn.Module):
    """Mean of the token embeddings, then an MLP: with ``nn.Embedding`` or ``nn.EmbeddingBag``."""

    def __init__(self, bag: bool, vocab=100_000, d=64, classes=2):
        super().__init__()
        self.bag = bag
        self.emb = nn.EmbeddingBag(vocab, d, mode="mean") if bag else nn.Embedding(vocab, d)
        self.head = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, idx):
        if self.bag:  # flat indices and offsets: the layout every Opacus mode expects
            b, t = idx.shape
            offsets = torch.arange(0, b * t, t, device=idx.device)
            return self.head(self.emb(idx.reshape(-1), offsets))
        return self.head(self.emb(idx).mean(1))


def build(name: str, batch: int, variant: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model and one fixed batch ``(x, y)``."""
    if name == "mlp":
        return mlp(), torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    if name == "cnn":
        return cnn(), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if name == "transformer":
        return Transformer(), torch.randint(0, 10_000, (batch, 128)), torch.randint(0, 2, (batch,))
    if name == "lstm":
        if variant.startswith("opacus"):  # Opacus needs its own LSTM (same parameters)
            from opacus.layers import DPLSTM

            return LSTMClassifier(DPLSTM), torch.randint(0, 10_000, (batch, 64)), torch.randint(0, 2, (batch,))
        return LSTMClassifier(), torch.randint(0, 10_000, (batch, 64)), torch.randint(0, 2, (batch,))
    bag = name == "bag"
    return BagOfEmbeddings(bag), torch.randint(0, 100_000, (batch, 50)), torch.randint(0, 2, (batch,))


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
    model, x, y = build(name, batch, variant)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    copies = 32 if variant in MECHANISM_VARIANTS else 10  # cyclic sampling: b batches must fit
    data = torch.utils.data.TensorDataset(x.repeat(copies, *([1] * (x.dim() - 1))),
                                          y.repeat(copies))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    criterion = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    extra = {}

    if variant.startswith("privgrad"):
        from privgrad import PrivacyEngine

        if variant == "privgrad-mkl":  # the rules' products on torch's BLAS, not oneDNN
            import privgrad.layers.kernels as kernels

            kernels._onednn_linear_works = lambda: False

        engine = PrivacyEngine()
        # privgrad-automatic / privgrad-adaptive: the clipping modes that need no tuned bound
        clipping = variant.split("-")[1] if variant in CLIPPING_VARIANTS else "flat"
        mechanism = {}
        if variant in MECHANISM_VARIANTS:
            from privgrad.mechanisms import BLT, BandMF

            kind, size = MECHANISM_VARIANTS[variant]
            mechanism = dict(steps=MECHANISM_STEPS, mechanism=BandMF(num_bands=size) if kind ==
                             "bandmf" else BLT(num_buffers=size, min_sep=16))
        engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                            noise_multiplier=SIGMA, max_grad_norm=CLIP, clipping=clipping,
                            **mechanism)
        extra["methods"] = None
        if variant == "privgrad-compile":  # torch.compile (inductor) of the private model
            forward = torch.compile(model)
    elif variant.startswith("opacus"):
        from opacus import PrivacyEngine as OpacusEngine

        mode = variant.split("-")[1]
        made = OpacusEngine().make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=False,
            grad_sample_mode=mode)
        model, optimizer = made[0], made[1]
        if mode == "ghost":
            criterion = made[2]
    elif variant == "floor":
        extra["noise_ms"] = noise_times(params)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if variant.startswith("privgrad"):
            drawn_batch(engine, batch)
        loss = criterion((forward if variant == "privgrad-compile" else model)(x), y)
        loss.backward()
        if variant == "floor":
            with torch.no_grad():
                for p in params:
                    p.grad.add_(torch.empty_like(p).normal_(0, SIGMA * CLIP))
        optimizer.step()

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
    if variant.startswith("privgrad"):
        extra["methods"] = sorted(set(engine_methods(engine)))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"ms": statistics.median(times) * 1e3, "steps": len(times), "peak_mb": rss_mb("VmHWM"),
            "base_mb": base, "faults": (after.ru_minflt - before.ru_minflt) / len(times),
            "kernel_share": (after.ru_stime - before.ru_stime) / cpu if cpu else math.nan, **extra}


def drawn_batch(engine, rows: int) -> None:
    """Report the fixed batch to the engine as the one its Poisson loader drew (what the loader
    does as it yields a batch): privgrad refuses rows its loader did not draw, and the benchmark
    times the step alone, without the loader's indexing and collation."""
    tracker = engine._rows.drawn
    sampler = engine._sampler
    tracker.queue(rows, sampler.step)  # (correlated noise takes the noise row of this step)
    sampler.step += 1
    tracker.deliver()


def engine_methods(engine) -> list[str]:
    """Which rule served each recorded layer, and by which method (for the notes)."""
    recorder = engine._recorder
    return [f"{type(m).__name__}:{type(r).__name__}" for m, r in recorder._rules.items()]


# -- the driver ---------------------------------------------------------------------------------
def psg_gb(name: str, batch: int) -> float:
    """Size of the per-sample gradients an Opacus materialising mode holds, in GB."""
    model, _, _ = build(name, 1, "privgrad")
    return batch * sum(p.numel() for p in model.parameters()) * 4 / 1e9


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
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the np, floor and privgrad runs this many times, interleaved")
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
    torch.set_num_threads(args.threads)
    if args.worker:
        name, batch, variant = args.worker
        print(json.dumps(worker(name, int(batch), variant, args.min_time, args.min_steps)))
        return

    import opacus

    load = os.getloadavg()
    print(f"# privgrad step time, {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} threads), "
          f"opacus {opacus.__version__}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"allocator: glibc {'tuned (--malloc-tuned)' if args.malloc_tuned else 'default'}, "
          f"OpenMP spin: {'GOMP_SPINCOUNT=%d (--omp-spin)' % args.omp_spin if args.omp_spin is not None else 'default'}")
    print("# ms/step medians; x = privgrad / column; each cell a fresh process\n")
    head = ("| model | B | np | np2 | floor | privgrad | hooks | functorch | ew | ghost | x np | "
            "x floor | x opacus | noise pg/op ms | MB np | MB pg (x) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    results = []
    variants = [v for v in args.variants.split(",") if v]
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rounds = [{k: run(name, batch, variant, args) for k, variant in (
                ("np", "nonprivate"), ("floor", "floor"), ("privgrad", "privgrad"))}
                for _ in range(args.rounds if "privgrad" in variants else 0)]
            r = {"model": name, "batch": batch, **(
                combined(rounds) if rounds else {"np": run(name, batch, "nonprivate", args),
                                                 "floor": run(name, batch, "floor", args)})}
            for v in variants:
                if v == "privgrad" and rounds:
                    continue
                if v.startswith("opacus") and v != "opacus-ghost" and psg_gb(name, batch) > args.max_psg_gb:
                    r[v] = {"skip": f"per-sample gradients ~{psg_gb(name, batch):.1f} GB"}
                elif v == "opacus-ghost" and name == "bag" and psg_gb(name, batch) > args.max_psg_gb:
                    r[v] = {"skip": "EmbeddingBag has no ghost norm in Opacus (materialises)"}
                else:
                    r[v] = run(name, batch, v, args)
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
        if pg.get("methods"):
            print(f"- {r['model']} B={r['batch']} privgrad rules: {', '.join(pg['methods'])}")
        if len(r.get("rounds", ())) > 1:
            print(f"- {r['model']} B={r['batch']} per round (np / floor / privgrad ms, x floor): "
                  + "; ".join(f"{a:.1f} / {b:.1f} / {c:.1f}, {c / b:.2f}" for a, b, c in r["rounds"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


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
