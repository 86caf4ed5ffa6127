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
    # privgrad's prediction (MechanismWarning) is kept, not raised: BLT without amplification
    # over 16 steps is the noisier one at epsilon 2 (1.31x DP-SGD's expected error); never DP-SGD
    flagged = {(r["epsilon"], r["mechanism"]) for r in rows if r["predicted_noisier"]}
    assert (2.0, "blt:2") in flagged and not any(n == "dpsgd" for _, n in flagged)
    printed = capsys.readouterr().out
    assert " blt:2* " in printed
    assert all(printed.count(f" {name} ") >= 2 for name in MECHANISMS)
    assert json.loads((tmp_path / "adult.json").read_text())["summary"] == json.loads(json.dumps(rows))


def test_unknown_mechanism_names_the_choices(adult_dir, tmp_path):
    cn = load_example("correlated_noise")
    with pytest.raises(SystemExit, match=r"dpsgd, bandmf:<b> or blt:<k>"):
        cn.main(["--data-dir", str(adult_dir), "--mechanisms", "dpftrl", "--epochs", "1",
                 "--seeds", "0", "--epsilons", "8", "--out", str(tmp_path)])


def test_bbc_trains_a_private_linear_probe_on_cached_embeddings(bbc_dir, tiny_encoder_dir,
                                                                tmp_path, monkeypatch):
    """``--dataset bbc``: the frozen encoder's pooled embeddings (computed once, cached under
    runs/cache keyed by the encoder and data folders), a linear head per mechanism; and
    ``--validation`` reports on a held-out share of the training set instead of the test set."""
    monkeypatch.chdir(tmp_path)  # the cache goes under ./runs/cache
    cn = load_example("correlated_noise")
    common = ["--dataset", "bbc", "--data-dir", str(bbc_dir), "--model-dir",
              str(tiny_encoder_dir), "--max-length", "16", "--epsilons", "8", "--seeds", "0", "--epochs", "2",
              "--batch-size", "4", "--mechanisms", "dpsgd", "bandmf:2", "--out", str(tmp_path)]
    m = cn.main(common)
    (cached,) = (tmp_path / "runs" / "cache").glob("bbc_minilm_pooled_16_*.pt")
    assert [r["mechanism"] for r in m["summary"]] == ["dpsgd", "bandmf:2"]
    assert all(0 < r["epsilon_spent"] <= 8.0 for r in m["runs"])
    held = cn.main(common + ["--validation", "0.25"])  # the cache is reused as it is
    assert list((tmp_path / "runs" / "cache").iterdir()) == [cached]
    # 40 articles: 32 train (8 per class x 5 x 0.8), then 24 of them train and 8 validate
    assert m["runs"][0]["steps"] == 2 * round(32 / 4) and held["runs"][0]["steps"] == 2 * round(24 / 4)
