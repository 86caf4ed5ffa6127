"""Correlated noise against DP-SGD at the same epsilon: DP-SGD, amplified BandMF and BLT.

At each epsilon and seed, on one data set, it trains the data set's own recipe (model, optimizer,
learning rate, batch size, epochs) once per mechanism, with the noise multiplier calibrated
(``make_private_with_epsilon``) for that mechanism's own privacy event: DP-SGD's Poisson-sampled
steps; BandMF's ``ceil(n / b)`` rounds at the group rate ``p = q b`` (cyclic Poisson sampling);
BLT's single Gaussian mechanism (no amplification is claimed for it). Every run of one epsilon
and seed starts from the same initial weights. The strategies are optimised for the recipe's
workload: ``momentum`` (heavy ball, with the recipe's momentum) under SGD with momentum,
``prefix_sum`` otherwise.

    python examples/correlated_noise.py --threads 1            # Adult, epsilons 1 3 8, seeds 0 1 2

Mechanisms are named ``dpsgd``, ``bandmf:<bands>`` and ``blt:<buffers>`` (``--mechanisms``); BLT
takes ``min_sep = floor(1 / q)`` groups (the most that still fit the batch). The table it printed
is in docs/examples.md ("Correlated noise").
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import clipping_comparison  # the sibling example: data sets, recipes and the data loading
import fashion_mnist
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.mechanisms import BLT, DPSGD, BandMF, MechanismWarning

RECIPES = {  # the data sets' own recipes; momentum SGD where the workload analysis applies
    "adult": dict(optimizer="sgd", lr=0.5, momentum=0.9, epochs=20, batch_size=1024,
                  grad_sample_mode="auto", max_grad_norm=1.0),
    "fashion_mnist": dict(optimizer="sgd", lr=4.0, momentum=0.9, epochs=40, batch_size=2048,
                          grad_sample_mode="materialize", max_grad_norm=0.1),
    "bbc": dict(optimizer="sgd", lr=0.03, momentum=0.9, epochs=20, batch_size=64,
                grad_sample_mode="auto", max_grad_norm=1.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=RECIPES, default="adult")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mechanisms", nargs="+", default=["dpsgd", "bandmf:8", "bandmf:24", "blt:4"])
    for name in ("optimizer", "lr", "momentum", "epochs", "batch_size", "max_grad_norm",
                 "train_size", "test_size"):
        kind = str if name == "optimizer" else int if name in (
            "epochs", "batch_size", "train_size", "test_size") else float
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--delta", type=float, default=1e-5)
    return clipping_comparison.parsed(p, argv, RECIPES, "runs/correlated_noise")


def mechanism(name: str, args, n_train: int):
    kind, _, size = name.partition(":")
    workload = dict(workload="momentum", momentum=args.momentum) if (
        args.optimizer == "sgd" and args.momentum > 0) else {}
    if kind == "dpsgd":
        return DPSGD()
    if kind == "bandmf":
        return BandMF(num_bands=int(size), **workload)
    if kind == "blt":
        return BLT(num_buffers=int(size), min_sep=int(n_train / args.batch_size), **workload)
    raise SystemExit(f"--mechanisms: unknown {name!r}; use dpsgd, bandmf:<b> or blt:<k>")


def train(args, data, epsilon: float, seed: int, name: str) -> dict:
    (x, y), (x_test, y_test), make_model = data
    torch.manual_seed(seed)
    model = make_model()
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    engine = PrivacyEngine(accountant="pld")
    with warnings.catch_warnings(record=True) as caught:  # the comparison is this example's point
        warnings.simplefilter("always", MechanismWarning)
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, target_epsilon=epsilon, target_delta=args.delta,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True),
            epochs=args.epochs, max_grad_norm=args.max_grad_norm,
            grad_sample_mode=args.grad_sample_mode, mechanism=mechanism(name, args, len(y)))
    noisier = False
    for w in caught:  # privgrad's prediction is kept in the results; anything else goes on
        if issubclass(w.category, MechanismWarning):
            noisier = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    result = dict(epsilon=epsilon, seed=seed, mechanism=name,
                  test_accuracy=fashion_mnist.accuracy(model, x_test, y_test),
                  epsilon_spent=engine.get_epsilon(args.delta),
                  noise_multiplier=engine.settings.noise_multiplier, steps=engine.steps,
                  predicted_noisier=noisier, seconds=round(time.perf_counter() - start, 1))
    engine.detach()
    return result


def summarise(runs: list[dict]) -> dict:
    acc = [r["test_accuracy"] for r in runs]
    return dict(epsilon=runs[0]["epsilon"], mechanism=runs[0]["mechanism"],
                mean=statistics.fmean(acc), std=statistics.pstdev(acc), min=min(acc),
                max=max(acc), sigma=runs[0]["noise_multiplier"], steps=runs[0]["steps"],
                predicted_noisier=runs[0]["predicted_noisier"])


def table(rows: list[dict]) -> str:
    lines = [f"{'epsilon':>7}  {'mechanism':<10} {'sigma':>7} {'steps':>6}  {'mean':>7}  "
             f"{'std':>5}  {'min-max':>15}  {'vs DP-SGD':>9}"]
    for r in rows:
        name = r["mechanism"] + ("*" if r["predicted_noisier"] else "")
        lines.append(f"{r['epsilon']:>7g}  {name:<10} {r['sigma']:>7.3f} {r['steps']:>6}  "
                     f"{r['mean']:>7.2%}  {100 * r['std']:>5.2f}  {r['min']:>7.2%}-{r['max']:.2%}  "
                     f"{100 * r['vs_dpsgd']:>+9.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = clipping_comparison.load(args)
    print(f"{args.dataset}: {len(data[0][1])} train, {len(data[1][1])} test; {args.optimizer} "
          f"lr {args.lr:g} momentum {args.momentum:g}, {args.epochs} epochs, expected batch "
          f"{args.batch_size}, C {args.max_grad_norm:g}, delta={args.delta:g} (PLD), seeds "
          f"{args.seeds}", flush=True)
    rows, runs = [], []
    for epsilon in sorted(args.epsilons):
        here = []
        for name in args.mechanisms:
            seeds = [train(args, data, epsilon, seed, name) for seed in args.seeds]
            for r in seeds:
                print(f"  epsilon {epsilon:g} seed {r['seed']} {name:>10} sigma "
                      f"{r['noise_multiplier']:.3f} {r['test_accuracy']:.2%} "
                      f"({r['seconds']:.1f} s)", flush=True)
            runs += seeds
            here.append(summarise(seeds))
        base = next((r["mean"] for r in here if r["mechanism"] == "dpsgd"), here[0]["mean"])
        for r in here:
            r["vs_dpsgd"] = r["mean"] - base
        rows += here
    print("mean, std (points) and min-max of test accuracy over the seeds; vs DP-SGD: points; "
          "*: privgrad predicted more noise than DP-SGD (MechanismWarning)")
    print(table(rows))
    return clipping_comparison.write_metrics("correlated_noise", args, rows, runs)

if __name__ == "__main__":
    main()
