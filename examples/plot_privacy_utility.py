"""Privacy-utility plot: sweep epsilon for one example and draw test accuracy against epsilon.

    python examples/plot_privacy_utility.py adult --epsilons 0.5 1 2 4 8
    python examples/plot_privacy_utility.py bbc_scratch --epsilons 1 3 8 -- --epochs 10
    python examples/plot_privacy_utility.py --metrics runs/adult/metrics.json   # no training

Arguments after ``--`` go to the example. The non-private accuracy (when the example runs it) is
the dashed line. The PNG and the sweep's metrics JSON go to ``--out`` (needs matplotlib:
``pip install 'privgrad[plot]'``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

EXAMPLES = ("adult", "bbc_scratch", "bbc_minilm", "fashion_mnist", "mnist")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("example", nargs="?", choices=EXAMPLES)
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    p.add_argument("--metrics", type=Path, nargs="+", help="plot these metrics files instead")
    p.add_argument("--out", type=Path, default=Path("runs/privacy_utility"))
    args = p.parse_args(argv)
    if (args.example is None) == (args.metrics is None):
        p.error("give one example to sweep, or --metrics files to plot")
    return args, extra


def sweep(example: str, epsilons: list[float], extra: list[str], out: Path) -> list[dict]:
    """Run the example; one metrics dict per run (``results`` lists flattened)."""
    sys.path.insert(0, str(Path(__file__).parent))
    module = importlib.import_module(example)
    if example in ("fashion_mnist", "mnist"):  # one epsilon per run
        runs = [module.main([*extra, "--epsilon", str(e), "--out", str(out / example)])
                for e in epsilons]
        return [dict(r, target_epsilon=e) for r, e in zip(runs, epsilons)]
    metrics = module.main([*extra, "--epsilons", *map(str, epsilons), "--out", str(out / example)])
    return metrics["results"]


def rows_from(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        metrics = json.loads(path.read_text())
        rows.extend(metrics.get("results", [metrics]))
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("the plot needs matplotlib; got none installed. "
                         "pip install 'privgrad[plot]'") from e
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("mode", r.get("recipe", "private")), []).append(r)
    for name, group in groups.items():
        private = sorted((r for r in group if r.get("epsilon") is not None),
                         key=lambda r: r["epsilon"])
        if private:
            ax.plot([r["epsilon"] for r in private], [100 * r["test_accuracy"] for r in private],
                    "o-", label=name if len(groups) > 1 else "DP-SGD")
        for r in group:
            if r.get("epsilon") is None:
                ax.axhline(100 * r["test_accuracy"], ls="--", color="gray",
                           label=f"non-private ({name})" if len(groups) > 1 else "non-private")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Path:
    args, extra = parse_args(argv)
    if args.metrics:
        rows, name = rows_from(args.metrics), args.metrics[0].parent.name
    else:
        rows, name = sweep(args.example, args.epsilons, extra, args.out), args.example
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}_sweep.json").write_text(json.dumps(rows, indent=2))
    path = args.out / f"{name}.png"
    plot(rows, f"{name}: accuracy against epsilon", path)
    print(f"plot written to {path}")
    return path


if __name__ == "__main__":
    main()
