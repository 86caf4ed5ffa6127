"""``privgrad demo``: train a small classifier with DP-SGD on real data that ships with
scikit-learn (the UCI handwritten digits, 1,797 8x8 images; no download).

It shows the whole product in one screen: ``make_private_with_epsilon`` picks the noise for the
budget, a progress bar shows the live epsilon (ending on the final one), and at the end it prints
the test accuracy, the epsilon spent at delta, and where the metrics file went. The options are
checked, and the ``--out`` folder created, before the data is loaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from privgrad import _validate
from privgrad._install import install_hint
from privgrad.cli.paths import make_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epsilon", type=float, default=3.0, help="privacy budget (default 3)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected batch size (default 256)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (SGD, momentum 0.9; default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="folder for metrics.json (default runs/demo)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_digits_split(seed: int):
    """Digits as float tensors, split 80/20 (stratified) with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit(
            "privgrad demo needs scikit-learn for its bundled data set; got no module "
            f"{e.name!r}. Install it: {install_hint('demo')}.") from e
    import torch

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images / 16.0, data.target, test_size=0.2, random_state=seed, stratify=data.target)

    def tensors(x, y):
        return torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y)

    return tensors(x_train, y_train), tensors(x_test, y_test)


def build_model():
    """A small convnet for 1x8x8 digits (GroupNorm, not BatchNorm: no batch statistics)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.GroupNorm(4, 32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm import tqdm

    from privgrad import PrivacyEngine

    _check(args)
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size)

    engine = PrivacyEngine(accountant=args.accountant)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm)
    print(f"privgrad demo: {len(x_train)} training digits, {len(x_test)} test digits; "
          f"noise_multiplier={engine.settings.noise_multiplier:.3f} for epsilon<={args.epsilon} "
          f"at delta={args.delta:g} over {args.epochs} epochs ({args.accountant.upper()})")

    start = time.perf_counter()
    history = []
    bar = tqdm(total=args.epochs * len(loader), disable=args.no_progress, unit="step",
               desc="private training")
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if engine.steps % 5 == 0:  # PLD epsilon costs ~50 ms; RDP would be cheaper but looser
                bar.set_postfix(epsilon=f"{engine.get_epsilon(args.delta):.2f}",
                                loss=f"{loss.item():.3f}")
        accuracy = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "epsilon": engine.get_epsilon(args.delta),
                        "test_accuracy": accuracy})
    bar.set_postfix(epsilon=f"{engine.get_epsilon(args.delta):.2f}", loss=f"{loss.item():.3f}")
    bar.close()  # the bar ends on the final epsilon
    seconds = time.perf_counter() - start

    epsilon = engine.get_epsilon(args.delta)
    metrics = {
        "dataset": "sklearn digits (UCI optical recognition of handwritten digits)",
        "train_size": len(x_train), "test_size": len(x_test),
        "test_accuracy": history[-1]["test_accuracy"], "epsilon": epsilon, "delta": args.delta,
        "target_epsilon": args.epsilon, "accountant": args.accountant,
        "noise_multiplier": engine.settings.noise_multiplier,
        "max_grad_norm": args.max_grad_norm, "sample_rate": engine.settings.sample_rate,
        "steps": engine.steps, "epochs": args.epochs, "seed": args.seed,
        "train_seconds": round(seconds, 2), "history": history,
    }
    path = args.out / "metrics.json"
    partial = path.with_name(path.name + ".tmp")  # a crash never leaves half a file behind
    partial.write_text(json.dumps(metrics, indent=2))
    partial.replace(path)
    print(f"test accuracy {metrics['test_accuracy']:.1%} at epsilon={epsilon:.2f}, "
          f"delta={args.delta:g} ({engine.steps} steps, {seconds:.0f} s)")
    print(f"metrics written to {path}")
    return 0


def _check(args: argparse.Namespace) -> None:
    """The options the engine does not check itself; the ``--out`` folder, created now."""
    _validate.positive_int("batch_size", args.batch_size, "Pass the expected batch size, e.g. 256.")
    _validate.positive("lr", args.lr, "Pass a learning rate such as 0.05.")
    if not isinstance(args.seed, int) or not 0 <= args.seed < 2**32:
        raise _validate.fail("seed must be in [0, 2**32)", "seed", args.seed, "Pass e.g. 0.")
    make_folder(args.out, "out", str(args.out), "Pass a folder that can be written, e.g. runs/demo.")


def evaluate(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
