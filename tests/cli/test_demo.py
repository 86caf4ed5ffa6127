"""``privgrad demo``: a short private run on the bundled digits, its metrics file and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from privgrad import cli


@pytest.mark.slow
def test_demo_trains_within_its_budget_and_writes_metrics(tmp_path, capsys):
    code = cli.main(["demo", "--epochs", "4", "--epsilon", "8", "--out", str(tmp_path)])
    assert code == 0
    out, err = capsys.readouterr()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert not list(tmp_path.glob("*.tmp"))
    assert metrics["steps"] == 4 * round(metrics["train_size"] / 256)  # Poisson steps per epoch
    assert 0 < metrics["epsilon"] <= 8.0  # calibrated noise never overshoots the budget
    assert metrics["epsilon"] > 7.5  # and spends most of it (calibration is tight)
    assert metrics["test_accuracy"] > 0.5  # 10 classes: far above chance after 4 private epochs
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    eps = [h["epsilon"] for h in metrics["history"]]
    assert eps == sorted(eps)
    assert f"epsilon={metrics['epsilon']:.2f}" in out and str(tmp_path) in out
    last_bar = err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"epsilon={metrics['epsilon']:.2f}" in last_bar  # the bar ends on the final epsilon


@pytest.mark.parametrize("argv,message", [
    (["--epsilon", "0"], "target_epsilon must be > 0"),
    (["--delta", "1.5"], "target_delta must be in \\(0, 1\\)"),
    (["--max-grad-norm", "-1"], "max_grad_norm must be > 0"),
    (["--batch-size", "0"], "batch_size must be >= 1; got batch_size=0"),   # was torch's traceback
    (["--lr", "-1"], "lr must be > 0 and finite; got lr=-1.0"),              # was torch's traceback
    (["--seed", "-1"], r"seed must be in \[0, 2\*\*32\); got seed=-1"),         # was sklearn's traceback
])
def test_demo_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    code = cli.main(["demo", "--no-progress", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("privgrad demo: error: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert not (tmp_path / "metrics.json").exists()


def test_python_dash_m_privgrad_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "privgrad", "demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--epsilon" in done.stdout and "--epochs" in done.stdout


def test_demo_checks_its_out_folder_before_training(tmp_path, capsys, monkeypatch):
    """A bad --out used to fail with a traceback after the whole training run."""
    (tmp_path / "file").write_text("")
    monkeypatch.setattr("privgrad.cli.demo.load_digits_split",
                        lambda seed: pytest.fail("the data was loaded before the check"))
    code = cli.main(["demo", "--no-progress", "--out", str(tmp_path / "file" / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"privgrad demo: error: out must lie in a folder; got out='{tmp_path}/file/run', "
                   f"where {tmp_path}/file is a file. Pass a folder that can be written, e.g. runs/demo.\n")
