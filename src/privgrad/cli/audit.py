"""``privgrad audit``: audit privgrad itself on a built-in model, in one training run.

    privgrad audit                       # epsilon 4, 1,000 canaries, text report
    privgrad audit --epsilon 8 --canaries 5000 --json
    privgrad audit --black-box           # mislabeled records scored by loss instead
    privgrad audit --canaries 5000 --guesses 500   # a budget whose bound exceeds epsilon when broken

Trains logistic regression on scikit-learn's bundled digits with the real PrivacyEngine and
white-box gradient canaries, then prints the report: the accountant's epsilon, the audited lower
bound, the band of a correct implementation, the conformance tests and the verdict. With
``--black-box`` the canaries are mislabeled records in an ordinary training loop, scored by their
loss decrease; that report has the bound and the verdict only. Exit status:
0 when the verdict is "consistent", 1 for "violation", 2 for bad input. torch is imported inside
``run()`` only.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epsilon", type=float, default=4.0, help="budget the noise is calibrated to (default 4)")
    parser.add_argument("--canaries", type=int, default=None,
                        help="number of canaries m (default 5000 white-box, 1000 --black-box)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument("--sample-rate", type=float, default=0.25, help="Poisson sample rate q (default 0.25)")
    parser.add_argument("--steps", type=int, default=400, help="DP-SGD steps (default 400)")
    parser.add_argument("--dataset", choices=("digits", "breast_cancer"), default="digits")
    parser.add_argument("--simulations", type=int, default=2000, help="simulated runs for the band (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--guesses", type=int, default=None, metavar="K",
                        help="guess K in + K out, fixed in advance (default: chosen by simulation)")
    parser.add_argument("--black-box", action="store_true",
                        help="mislabeled records scored by loss instead of gradient canaries")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the audit; returns 0 (consistent), 1 (violation) or 2 (bad input)."""

    from privgrad.auditing.builtin import BuiltinAudit

    config = BuiltinAudit(epsilon=args.epsilon, num_canaries=args.canaries, delta=args.delta,
                          sample_rate=args.sample_rate, steps=args.steps, dataset=args.dataset,
                          seed=args.seed, simulations=args.simulations)
    guesses = None
    if args.guesses is not None:
        from privgrad import _validate

        k = _validate.positive_int("guesses", args.guesses, "Pass e.g. 500, or leave it out.")
        m = config.num_canaries or (1000 if args.black_box else 5000)
        if 2 * k > m:
            raise _validate.fail(f"2 * guesses must be <= the number of canaries ({m})",
                                 "guesses", k, f"Pass at most {m // 2}.")
        guesses = (k, k)
    import torch
    from tqdm import tqdm

    from privgrad import PrivacyEngine
    from privgrad.auditing.builtin import run_builtin_audit, run_builtin_black_box_audit

    torch.set_num_threads(1)  # a logistic regression: threads only add contention
    audit = run_builtin_black_box_audit if args.black_box else run_builtin_audit
    kind = "black-box" if args.black_box else "white-box"
    bar = tqdm(total=config.steps, disable=args.no_progress or args.json, unit="step",
               desc=f"private training with {kind} canaries", file=sys.stderr)
    try:
        report = audit(PrivacyEngine(), config, guesses=guesses,
                       on_step=lambda step: bar.update(step - bar.n))
    finally:
        bar.close()
    print(report.to_json(sort_keys=True) if args.json else report.text())
    return 0 if report.verdict == "consistent" else 1
