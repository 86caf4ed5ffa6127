"""Protect people, not rows: user-level DP on UCI Adult, against example-level DP.

Adult has one row per person and no user column, and no data set with natural users installs
offline here, so this example makes users the documented way: records that share the
quasi-identifier (workclass, occupation, native-country, sex, race) are taken in file order in
chunks of at most ``--rows-per-user`` (default 50) and each chunk is one "user". Such a user's
rows look alike, as one person's messages or visits do; the sizes are heavy-tailed (many users
of one to a few rows, many of the full 50). The grouping reads only the training file.

Three numbers per run, all at delta = 1e-5 (PLD):

- **example-level DP** (``privacy_unit="example"``, target epsilon per row), and what it gives
  a user with ``n`` rows: each step samples ``J ~ Binomial(n, q)`` of them, and when the rows
  push the same way (near-duplicates: the worst case) they move the sum by ``J C``: the
  mixture-of-Gaussians mechanism, accounted with ``dp_accounting``'s PLD over all steps.
- **user-level DP** (``privacy_unit="user"``, at most ``k`` rows per user and step, target
  epsilon per user, whatever their number of rows), at a few epsilons, to find the one whose
  accuracy matches the example-level run.

Command and what it printed (see docs/examples.md for machine and date):

    python examples/adult_users.py

    adult: 32561 rows, 2188 users; rows per user: 844 users of 1, 703 of 10 or more, 494 of 50; delta 1e-05, 20 epochs, 512 rows per batch, k=16
      privacy unit    k   sigma  steps  epsilon  test acc
           example    -   2.258   1280     1.00    84.76%
              user   16   3.353    560     1.00    84.32%
              user   16   1.202    560     4.00    84.56%
    the example-level run, seen from a user with n rows that push the same way: n=1: epsilon 1.0, n=10: epsilon 14.5, n=50: epsilon 145.4

(2026-12-06, 2-core x86_64 VM, torch 2.13.0+cpu; 2.5 minutes.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adult  # the sibling example: its data loading, unchanged

KEY = ("workclass", "occupation", "native-country", "sex", "race")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilon", type=float, default=1.0, help="of the example-level run")
    p.add_argument("--user-epsilons", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=512, help="expected rows per batch")
    p.add_argument("--rows-per-user", type=int, default=50)
    p.add_argument("--k", type=int, default=16, help="max_examples_per_user")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/adult_users"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def user_ids(rows: list[list[str]], rows_per_user: int) -> list[int]:
    """One user id per row: chunks of at most ``rows_per_user`` rows sharing ``KEY``."""
    columns = [adult.COLUMNS.index(c) for c in KEY]
    seen: Counter = Counter()
    groups: dict = {}
    ids = []
    for row in rows:
        key = tuple(row[j] for j in columns)
        chunk = seen[key] // rows_per_user
        seen[key] += 1
        ids.append(groups.setdefault((key, chunk), len(groups)))
    return ids


def train(args, train_set, test_set, ids, k: int | None, epsilon: float) -> dict:
    """One private run at ``epsilon``: example-level (``k`` None) or user-level."""
    torch.manual_seed(args.seed)
    (x, y), (x_test, y_test) = train_set, test_set
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    users = {} if k is None else {"privacy_unit": "user", "user_ids": ids,
                                  "max_examples_per_user": k}
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=args.batch_size),
        target_epsilon=epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=1.0, **users)
    for _ in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    s = engine.settings
    return {"unit": s.privacy_unit, "k": k, "sample_rate": s.sample_rate,
            "noise_multiplier": s.noise_multiplier, "steps": engine.steps,
            "epsilon": engine.get_epsilon(args.delta), "test_accuracy": accuracy}


def heavy_user_epsilon(run: dict, rows: int, delta: float) -> float:
    """The epsilon an example-level run gives a user with ``rows`` rows that push the same
    way: per step ``J ~ Binomial(rows, q)`` of them move the sum by ``J C`` (PLD, pessimistic)."""
    from dp_accounting.pld import privacy_loss_distribution as pld
    from scipy import stats

    j = np.arange(rows + 1)
    weights = stats.binom.pmf(j, rows, run["sample_rate"])
    keep = weights > 1e-30
    step = pld.from_mixture_gaussian_mechanism(
        standard_deviation=run["noise_multiplier"], sensitivities=[float(v) for v in j[keep]],
        sampling_probs=list(weights[keep] / weights[keep].sum()),
        value_discretization_interval=0.002)
    return float(step.self_compose(run["steps"]).get_epsilon_for_delta(delta))


def main(argv=None) -> dict:
    args = parse_args(argv)
    data_dir = args.data_dir or adult.default_data_dir()
    train_set, test_set = adult.load(data_dir)
    ids = user_ids(adult.read_rows(data_dir / "adult.data"), args.rows_per_user)
    sizes = Counter(Counter(ids).values())
    heavy = max(sizes)
    print(f"adult: {len(ids)} rows, {len(set(ids))} users; rows per user: "
          f"{sizes[1]} users of 1, {sum(v for n, v in sizes.items() if n >= 10)} of 10 or more, "
          f"{sizes[heavy]} of {heavy}; delta {args.delta:g}, {args.epochs} epochs, "
          f"{args.batch_size} rows per batch, k={args.k}")
    runs = [train(args, train_set, test_set, ids, None, args.epsilon)]
    runs += [train(args, train_set, test_set, ids, args.k, eps) for eps in args.user_epsilons]
    print(f"{'privacy unit':>14} {'k':>4} {'sigma':>7} {'steps':>6} {'epsilon':>8} "
          f"{'test acc':>9}")
    for r in runs:
        print(f"{r['unit']:>14} {r['k'] or '-':>4} {r['noise_multiplier']:>7.3f} "
              f"{r['steps']:>6} {r['epsilon']:>8.2f} {r['test_accuracy']:>9.2%}")
    seen = {n: heavy_user_epsilon(runs[0], n, args.delta) for n in sorted({1, 10, heavy})}
    print("the example-level run, seen from a user with n rows that push the same way: "
          + ", ".join(f"n={n}: epsilon {e:.1f}" for n, e in seen.items()))
    metrics = {"example": "adult_users", "runs": runs, "users": len(set(ids)),
               "rows": len(ids), "heaviest_user_rows": heavy,
               "example_level_epsilon_of_a_user_with_n_rows": seen,
               "delta": args.delta, "epochs": args.epochs,
               "batch_size": args.batch_size, "rows_per_user": args.rows_per_user}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
