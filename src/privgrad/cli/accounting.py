"""``privgrad epsilon`` and ``privgrad noise``: privacy budget arithmetic from the command line.

    privgrad epsilon --dataset-size 60000 --batch-size 256 --epochs 10 --noise-multiplier 1.1 --delta 1e-5
    privgrad noise   --dataset-size 60000 --batch-size 256 --epochs 10 --target-epsilon 3 --delta 1e-5

Both accept ``--accountant pld|rdp`` (default pld), ``--json`` (one object; an infinite epsilon,
from ``--noise-multiplier 0``, is ``null``) and ``--plot FILE.png`` (epsilon against epochs for
PLD and RDP; needs the ``plot`` extra; any format matplotlib writes, chosen by the suffix).
``privgrad epsilon --report`` adds the privacy report (``privgrad.accounting.report``): epsilon
at several deltas, the best membership attack's TPR at FPR 0.1%, 1% and 10%, its advantage, the
Gaussian-DP mu and the trade-off curve (in ``--json``, ``"tradeoff"``: a list of
``{"fpr": ..., "tpr": ...}`` points); with ``--plot`` it draws that curve beside the curves of
no privacy and of perfect privacy instead of epsilon against epochs. A
missing folder of the plot is created, as ``privgrad demo --out`` and ``PrivacyLogger`` create
theirs; the path is checked before any accounting runs. Bad input exits with status 2 and a one-line error. The sample rate is
``batch_size / dataset_size`` (Poisson sampling with that expected batch size) and the step count
is ``round(epochs * round(dataset_size / batch_size))``: an epoch is ``round(1 / q)`` steps, as the
engine's Poisson loader counts them, so the epsilon printed here is the one a run of that many
epochs spends. This module never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from privgrad import _validate
from privgrad._install import install_hint
from privgrad.cli.paths import make_folder
from privgrad.errors import ConfigError
from privgrad.sampling.poisson import steps_per_epoch

COMMANDS = ("epsilon", "noise")


def add_arguments_for(name: str, parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of subcommand ``name`` (``"epsilon"`` or ``"noise"``)."""
    from privgrad.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT

    parser.add_argument("--dataset-size", type=int, required=True, help="number of training records N")
    parser.add_argument("--batch-size", type=int, required=True, help="expected batch size (sample_rate = batch / N)")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--epochs", type=float, help="training length in epochs")
    when.add_argument("--steps", type=int, help="training length in steps")
    if name == "epsilon":
        parser.add_argument("--noise-multiplier", type=float, required=True, help="noise std / max_grad_norm")
        parser.add_argument("--report", action="store_true",
                            help="also the best membership attack: trade-off curve, TPR at low FPR, advantage, GDP mu")
    else:
        parser.add_argument("--target-epsilon", type=float, required=True, help="the epsilon to reach")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument("--accountant", choices=sorted(ACCOUNTANTS), default=DEFAULT_ACCOUNTANT)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw epsilon against epochs for PLD and RDP")


def _schedule(args: argparse.Namespace) -> tuple[float, int]:
    """(sample_rate, steps) from the dataset size, batch size and length."""
    n = _validate.positive_int("dataset_size", args.dataset_size, "Pass the number of training records, e.g. 60000.")
    b = _validate.positive_int("batch_size", args.batch_size, "Pass the expected batch size, e.g. 256.")
    if b > n:
        raise _validate.fail("batch_size must be <= dataset_size", "batch_size", b, f"Pass at most {n}.")
    if args.steps is not None:
        steps = _validate.positive_int("steps", args.steps, "Pass the number of training steps, e.g. 1000.")
    else:
        epochs = _validate.positive("epochs", args.epochs, "Pass the number of epochs, e.g. 10.")
        steps = max(1, round(epochs * steps_per_epoch(b / n)))  # as the engine's loader
    return b / n, steps


def run_for(name: str, args: argparse.Namespace) -> int:
    """Run subcommand ``name``; returns the exit status (2 on bad input)."""
    plot = _plot_path(args.plot) if args.plot else None  # fail before the accounting runs
    result = _epsilon(args) if name == "epsilon" else _noise(args)
    report = _privacy_report(result) if getattr(args, "report", False) else None
    if plot is not None:
        if report is None:
            _plot(plot, result)
        else:
            _plot_tradeoff(plot, report)
        result["plot"] = args.plot
    if args.json:  # JSON has no infinity: an unbounded epsilon is written as null
        plain = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in result.items()}
        print(json.dumps({**plain, **(report.to_dict() if report else {})}, sort_keys=True))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            shown = f"{value:.6g}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
        if report is not None:
            print(report.text())
    return 0


def _privacy_report(result: dict):
    from privgrad.accounting import make_accountant
    from privgrad.accounting.report import privacy_report

    acc = make_accountant(result["accountant"])
    acc.step(noise_multiplier=result["noise_multiplier"], sample_rate=result["sample_rate"],
             num_steps=result["steps"])
    return privacy_report(acc, delta=result["delta"])


def _epsilon(args: argparse.Namespace) -> dict:
    from privgrad.accounting import epsilon_for

    q, steps = _schedule(args)
    epsilon = epsilon_for(
        noise_multiplier=args.noise_multiplier, sample_rate=q, steps=steps, delta=args.delta, accountant=args.accountant
    )
    return _report(args, q, steps, args.noise_multiplier, epsilon)


def _noise(args: argparse.Namespace) -> dict:
    from privgrad.accounting import epsilon_for, get_noise_multiplier

    q, steps = _schedule(args)
    sigma = get_noise_multiplier(
        target_epsilon=args.target_epsilon, target_delta=args.delta, sample_rate=q, steps=steps, accountant=args.accountant
    )
    epsilon = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=args.delta, accountant=args.accountant)
    return _report(args, q, steps, sigma, epsilon)


def _report(args: argparse.Namespace, q: float, steps: int, sigma: float, epsilon: float) -> dict:
    return {
        "accountant": args.accountant,
        "sample_rate": q,
        "steps": steps,
        "epochs": steps * q,
        "noise_multiplier": sigma,
        "delta": args.delta,
        "epsilon": epsilon,
    }


def _plot_path(plot: str) -> Path:
    """``--plot`` as a path whose format matplotlib writes, its folder created.

    Raises:
        ImportError: matplotlib is missing (names the extra). ConfigError: an unknown suffix, a
            folder, or a folder that cannot be created.
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:
        raise ImportError(
            f"--plot needs matplotlib; got {e}. Install the plot extra: {install_hint('plot')}."
        ) from e
    path = Path(plot)
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(
            f"plot must end in a format matplotlib writes ({', '.join('.' + f for f in sorted(formats))}); "
            f"got plot={plot!r}. Pass e.g. eps.png or eps.pdf.")
    if path.is_dir():
        raise ConfigError(f"plot must name a file; got plot={plot!r}, a folder. Pass e.g. {path / 'eps.png'}.")
    make_folder(path.parent, "plot", plot, "Pass a path in a writable folder, e.g. runs/eps.png.")
    return path


def _plot(path: Path, result: dict) -> None:
    """Epsilon against epochs for PLD and RDP at the result's noise and sample rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from privgrad.accounting import make_accountant

    q, steps, sigma, delta = result["sample_rate"], result["steps"], result["noise_multiplier"], result["delta"]
    marks = sorted({max(1, round(steps * k / 40)) for k in range(1, 41)})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("pld", "rdp"):
        acc, eps = make_accountant(name), []
        for mark in marks:
            acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=mark - acc.steps)
            eps.append(acc.get_epsilon(delta))
        ax.plot([m * q for m in marks], eps, label=name.upper())
    ax.set_xlabel("epochs")
    ax.set_ylabel(f"epsilon (delta = {delta:g})")
    ax.set_title(f"noise_multiplier = {sigma:.4g}, sample_rate = {q:.4g}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise ConfigError(
            f"plot must be writable; got plot={str(path)!r} ({e.strerror}). Pass a path in a "
            f"writable folder.") from e
    finally:
        plt.close(fig)


def _plot_tradeoff(path: Path, report) -> None:
    """The report's trade-off curve beside perfect privacy and no privacy
    ([`PrivacyReport.figure()`][privgrad.accounting.report.PrivacyReport.figure])."""
    try:
        report.figure().savefig(path, dpi=120)
    except OSError as e:
        raise ConfigError(
            f"plot must be writable; got plot={str(path)!r} ({e.strerror}). Pass a path in a "
            f"writable folder.") from e
