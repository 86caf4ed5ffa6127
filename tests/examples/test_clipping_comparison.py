"""examples/clipping_comparison.py end to end on the tiny stand-in data: every method appears at
every epsilon, with finite accuracies, in the printed table and in the JSON."""

import json
import math

from .conftest import load_example

METHODS = ["fixed C=0.1", "fixed C=1", "adaptive from 0.01x best", "adaptive from 100x best",
           "automatic (gamma 0.01)"]


def test_adult_every_method_at_every_epsilon(adult_dir, tmp_path, capsys):
    cc = load_example("clipping_comparison")
    m = cc.main(["--data-dir", str(adult_dir), "--epsilons", "2", "8", "--seeds", "3",
                 "--grid", "0.1", "1", "--epochs", "1", "--batch-size", "32", "--lr", "0.05",
                 "--out", str(tmp_path)])
    rows = m["summary"]
    assert [(r["epsilon"], r["method"]) for r in rows] == [(e, n) for e in (2.0, 8.0) for n in METHODS]
    assert all(math.isfinite(r["mean"]) and 0 <= r["min"] <= r["mean"] <= r["max"] <= 1 for r in rows)
    assert all(r["seeds"] == [3] for r in rows)
    for epsilon in (2.0, 8.0):
        fixed = [r for r in rows if r["epsilon"] == epsilon and r["method"].startswith("fixed")]
        best = [r for r in fixed if r["best_fixed"]]
        assert len(best) == 1 and best[0]["mean"] == max(r["mean"] for r in fixed)
        adaptive = [r for r in rows if r["epsilon"] == epsilon and r["method"].startswith("adaptive")]
        # adaptive starts at 0.01x and 100x the best grid C, and its bound moved from there
        assert [r["max_grad_norm"] for r in adaptive] == [0.01 * best[0]["max_grad_norm"],
                                                          100 * best[0]["max_grad_norm"]]
        assert all(math.isfinite(r["final_bound"]) and r["final_bound"] != r["max_grad_norm"]
                   for r in adaptive)
    # every run is private at its epsilon: the same noise multiplier for every method, and the
    # adaptive runs pay for the count with a larger gradient noise multiplier
    for run in m["runs"]:
        assert 0 < run["epsilon_spent"] <= run["epsilon"]
        if run["clipping"] == "adaptive":
            assert run["gradient_noise_multiplier"] > run["noise_multiplier"]
        else:
            assert run["gradient_noise_multiplier"] == run["noise_multiplier"]
    assert len(m["runs"]) == 2 * len(METHODS)

    printed = capsys.readouterr().out
    for name in METHODS:
        assert printed.count(name) == 2
    assert json.loads((tmp_path / "adult.json").read_text())["summary"] == json.loads(json.dumps(rows))


def test_fashion_mnist_uses_its_recipe(fashion_dir, tmp_path):
    cc = load_example("clipping_comparison")
    m = cc.main(["--dataset", "fashion_mnist", "--data-dir", str(fashion_dir), "--epsilons", "3",
                 "--seeds", "0", "--grid", "0.1", "--epochs", "1", "--batch-size", "32",
                 "--train-size", "64", "--test-size", "20", "--out", str(tmp_path)])
    assert m["settings"]["optimizer"] == "sgd" and m["settings"]["lr"] == 4.0
    assert [r["method"] for r in m["summary"]] == ["fixed C=0.1", "adaptive from 0.01x best",
                                                   "adaptive from 100x best", "automatic (gamma 0.01)"]
    assert m["summary"][-1]["max_grad_norm"] == 0.1  # under SGD, automatic keeps the recipe's C
    assert all(math.isfinite(r["mean"]) for r in m["summary"])
    assert (tmp_path / "fashion_mnist.json").exists()
