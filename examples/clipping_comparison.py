"""Clipping without tuning: the best fixed bound of a grid against adaptive and automatic clipping.

At each epsilon and seed, on one data set, it trains:

* ``fixed``: flat clipping at every ``max_grad_norm`` C of ``--grid``. The table marks the best
  (highest mean test accuracy). Picking it is optimistic twice: the search spends privacy
  budget nobody accounted for, and it is chosen on the test set.
* ``adaptive``: quantile clipping (Andrew et al. 2021, ``clipping="adaptive"``) started at a bad
  bound, ``--adaptive-factors`` (0.01x and 100x) times the best grid C, with the paper's
  hyper-parameters left as they are (target quantile 0.5, geometric step 0.2, count noise = the
  expected batch / 20). Epsilon is the same: the count's share of the budget is paid for by
  raising the gradient's noise a little.
* ``automatic``: AUTO-S (Bu et al. 2023, ``clipping="automatic"``), each example scaled to
  ``C g / (||g|| + gamma)``. Under Adam C does not matter (signal and noise scale together);
  under SGD it multiplies the learning rate, so the SGD data set uses its recipe's C.

Every run of one epsilon and seed starts from the same initial weights and draws from the same
seeded generators; the noise multiplier is calibrated (``make_private_with_epsilon``) for that
epsilon after the given epochs. Data and model come from examples/adult.py,
examples/fashion_mnist.py and examples/bbc_minilm.py (``--dataset bbc``: a linear head on the
frozen encoder's cached embeddings), with their defaults (``--dataset fashion_mnist`` takes ~14 minutes a
run on one core at the full 40 epochs: cut ``--epochs`` and ``--train-size`` and say so).

    python examples/clipping_comparison.py --threads 1      # Adult, epsilons 1 3 8, seeds 0 1 2

The table it printed is in docs/examples.md ("Clipping without tuning"). In short, on Adult
(2026-12-06): automatic clipping came within 0.4 points of the best fixed C at every epsilon;
adaptive clipping at the median collapsed to the majority class from both starting bounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import adult  # the sibling examples in examples/: their data loading and models, not copies
import fashion_mnist
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine

# Each data set's own example's defaults; a flag given on the command line wins.
DATASETS = {
    "adult": dict(optimizer="adam", lr=0.002, momentum=0.0, epochs=20, batch_size=1024,
                  automatic_c=1.0, grad_sample_mode="auto"),
    "fashion_mnist": dict(optimizer="sgd", lr=4.0, momentum=0.9, epochs=40, batch_size=2048,
                          automatic_c=0.1, grad_sample_mode="materialize"),
    # bbc_minilm.py's cheapest mode: a linear head on the frozen encoder's pooled embeddings
    "bbc": dict(optimizer="adam", lr=0.01, momentum=0.0, epochs=20, batch_size=64,
                automatic_c=1.0, grad_sample_mode="auto"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="adult")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--grid", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0],
                   help="the fixed bounds C to try")
    p.add_argument("--adaptive-factors", type=float, nargs="+", default=[0.01, 100.0],
                   help="adaptive clipping starts at these multiples of the best grid C")
    p.add_argument("--target-quantile", type=float, default=0.5,
                   help="the paper's median by default (privgrad's own default is 0.9)")
    p.add_argument("--quantile-lr", type=float, default=0.2)
    p.add_argument("--gamma", type=float, default=0.01, help="automatic clipping's constant")
    p.add_argument("--automatic-c", type=float, default=None, help="automatic clipping's C")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="expected (Poisson) batch size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--train-size", type=int, default=None, help="use the first N training rows")
    p.add_argument("--test-size", type=int, default=None, help="use the first N test rows")
    return parsed(p, argv, DATASETS, "runs/clipping_comparison")


def parsed(p: argparse.ArgumentParser, argv, recipes: dict, out: str) -> argparse.Namespace:
    """``p``'s arguments plus the data and run options both comparison examples share, with
    the data set's recipe filling what the command line left out."""
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--model-dir", type=Path, default=None, help="bbc: the encoder's folder")
    p.add_argument("--max-length", type=int, default=128, help="bbc: tokens kept per article")
    p.add_argument("--validation", type=float, default=None,
                   help="hold out this share of the training set and report on it (tuning)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(out))
    args = p.parse_args(argv)
    for key, value in recipes[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def load(args):
    """``(train, test, make_model)``: tensors and a constructor for the data set's model."""
    if args.dataset == "adult":
        (x, y), (x_test, y_test) = adult.load(args.data_dir)
        make_model = lambda: nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 2))
    elif args.dataset == "bbc":
        import bbc_minilm

        (x, y), (x_test, y_test) = bbc_minilm.frozen_features(args.max_length, args.model_dir,
                                                              args.data_dir)
        make_model = lambda: nn.Linear(x.shape[1], len(bbc_minilm.CLASSES))
    else:
        data_dir = args.data_dir or fashion_mnist.DEFAULT_DATA
        x, y = fashion_mnist.load_split(data_dir, "train", None)
        x_test, y_test = fashion_mnist.load_split(data_dir, "t10k", None)
        make_model = fashion_mnist.tramer_boneh_cnn
    if args.validation:  # tune on the training data: its last share held out
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        cut = len(y) - int(round(args.validation * len(y)))
        (x, y), (x_test, y_test) = (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])
    n, n_test = args.train_size, args.test_size
    return (x[:n], y[:n]), (x_test[:n_test], y_test[:n_test]), make_model


def train(args, data, epsilon: float, seed: int, clipping: str, c: float) -> dict:
    """One private run; its test accuracy and, for adaptive clipping, the bound it ended at."""
    (x, y), (x_test, y_test), make_model = data
    torch.manual_seed(seed)
    model = make_model()
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    options = {"automatic": dict(gamma=args.gamma), "flat": {},
               "adaptive": dict(target_quantile=args.target_quantile, quantile_lr=args.quantile_lr)}
    engine = PrivacyEngine(accountant="pld")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, target_epsilon=epsilon, target_delta=args.delta,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True),
        epochs=args.epochs, max_grad_norm=c, clipping=clipping,
        grad_sample_mode=args.grad_sample_mode, **options[clipping])
    start = time.perf_counter()
    for _ in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    result = dict(epsilon=epsilon, seed=seed, clipping=clipping, max_grad_norm=c,
                  test_accuracy=fashion_mnist.accuracy(model, x_test, y_test),
                  epsilon_spent=engine.get_epsilon(args.delta),
                  noise_multiplier=engine.settings.noise_multiplier,
                  gradient_noise_multiplier=engine.settings.gradient_noise_multiplier,
                  final_bound=engine.clipping_bound if clipping == "adaptive" else None,
                  steps=engine.steps, seconds=round(seconds, 1))
    engine.detach()
    return result


def summarise(name: str, runs: list[dict]) -> dict:
    acc = [r["test_accuracy"] for r in runs]
    bounds = [r["final_bound"] for r in runs if r["final_bound"] is not None]
    return dict(epsilon=runs[0]["epsilon"], method=name, max_grad_norm=runs[0]["max_grad_norm"],
                mean=statistics.fmean(acc), std=statistics.pstdev(acc), min=min(acc),
                max=max(acc), final_bound=statistics.fmean(bounds) if bounds else None,
                seeds=[r["seed"] for r in runs])


def compare(args, data, epsilon: float, log) -> tuple[list[dict], list[dict]]:
    """Every method at one epsilon, summarised over the seeds; the best fixed C first."""
    def over_seeds(clipping, c):
        runs = [train(args, data, epsilon, seed, clipping, c) for seed in args.seeds]
        for r in runs:
            log(f"  epsilon {epsilon:g} seed {r['seed']} {clipping:>9} C={c:<8g} "
                f"{r['test_accuracy']:.2%}  ({r['seconds']:.1f} s)")
        all_runs.extend(runs)
        return runs

    all_runs: list[dict] = []
    fixed = [summarise(f"fixed C={c:g}", over_seeds("flat", c)) for c in args.grid]
    best = max(fixed, key=lambda s: s["mean"])
    rows = fixed + [summarise(f"adaptive from {f:g}x best", over_seeds("adaptive", f * best["max_grad_norm"]))
                    for f in args.adaptive_factors]
    rows.append(summarise(f"automatic (gamma {args.gamma:g})",
                          over_seeds("automatic", args.automatic_c)))
    for row in rows:
        row["best_fixed"] = row is best
        row["gap_to_best"] = row["mean"] - best["mean"]
    return rows, all_runs


def table(rows: list[dict]) -> str:
    header = (f"{'epsilon':>7}  {'method':<26} {'C (start)':>9}  {'mean':>7}  {'std':>5}  "
              f"{'min-max':>15}  {'vs best':>7}  {'final C':>8}")
    lines = [header]
    for r in rows:
        name = r["method"] + (" *" if r["best_fixed"] else "")
        final = "" if r["final_bound"] is None else f"{r['final_bound']:.3g}"
        lines.append(f"{r['epsilon']:>7g}  {name:<26} {r['max_grad_norm']:>9g}  {r['mean']:>7.2%}  "
                     f"{100 * r['std']:>5.2f}  {r['min']:>7.2%}-{r['max']:.2%}  "
                     f"{100 * r['gap_to_best']:>+7.2f}  {final:>8}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load(args)
    print(f"{args.dataset}: {len(data[0][1])} train, {len(data[1][1])} test; {args.optimizer} "
          f"lr {args.lr:g}, {args.epochs} epochs, expected batch {args.batch_size}, "
          f"delta={args.delta:g} (PLD), seeds {args.seeds}", flush=True)
    rows, runs = [], []
    for epsilon in sorted(args.epsilons):
        epsilon_rows, epsilon_runs = compare(args, data, epsilon, lambda s: print(s, flush=True))
        rows += epsilon_rows
        runs += epsilon_runs
    print("mean, std (points) and min-max of test accuracy over the seeds; * the best fixed C; "
          "vs best: points against it; final C: adaptive's last bound (mean)")
    print(table(rows))
    return write_metrics("clipping_comparison", args, rows, runs)


def write_metrics(example: str, args, rows: list[dict], runs: list[dict]) -> dict:
    """The summary, every run, the settings and the machine, as ``<out>/<dataset>.json``."""
    metrics = dict(example=example, dataset=args.dataset, summary=rows, runs=runs,
                   settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                   torch=torch.__version__, date=date.today().isoformat())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.dataset}.json"
    path.write_text(json.dumps(metrics, indent=2))
    print(f"metrics written to {path}")
    return metrics


if __name__ == "__main__":
    main()
