"""examples/correlated_noise.py end to end on the tiny stand-in data: every mechanism at every
epsilon, each calibrated to its own event and within its epsilon, in the table and the JSON."""

import json
import math

import pytest

from .conftest import load_example

MECHANISMS = ["dpsgd", "bandmf:2", "blt:2"]


def test_adult_every_mechanism_at_every_epsilon(adult_dir, tmp_path, capsys):
    cn = load_example("correlated_noise")
    m = cn.main(["--data-dir", str(adult_dir), "--epsilons", "2", "8", "--seeds", "3",
                 "--mechanisms", *MECHANISMS, "--epochs", "2", "--batch-size", "16",
                 "--out", str(tmp_path)])
    rows = m["summary"]
    assert [(r["epsilon"], r["mechanism"]) for r in rows] == [
        (e, n) for e in (2.0, 8.0) for n in MECHANISMS]
    assert all(math.isfinite(r["mean"]) and 0 <= r["min"] <= r["mean"] <= r["max"] <= 1
               for r in rows)
    for epsilon in (2.0, 8.0):
        here = {r["mechanism"]: r for r in rows if r["epsilon"] == epsilon}
        assert here["dpsgd"]["vs_dpsgd"] == 0.0
        # BandMF pays for its fewer, larger-rate rounds with more noise per step
        assert here["bandmf:2"]["sigma"] > here["dpsgd"]["sigma"]
        assert here["dpsgd"]["steps"] == here["bandmf:2"]["steps"]  # one epoch: round(N / B)
    for run in m["runs"]:
        assert 0 < run["epsilon_spent"] <= run["epsilon"]
    printed = capsys.readouterr().out
    assert all(printed.count(f" {name} ") >= 2 for name in MECHANISMS)
    assert json.loads((tmp_path / "adult.json").read_text())["summary"] == json.loads(json.dumps(rows))


def test_unknown_mechanism_names_the_choices(adult_dir, tmp_path):
    cn = load_example("correlated_noise")
    with pytest.raises(SystemExit, match=r"dpsgd, bandmf:<b> or blt:<k>"):
        cn.main(["--data-dir", str(adult_dir), "--mechanisms", "dpftrl", "--epochs", "1",
                 "--seeds", "0", "--epsilons", "8", "--out", str(tmp_path)])
