"""``step_time.py --in-process``: the variants alternate step by step in one process, every row
says what ran and what did not, and the table says which mode printed it (the numbers are run by
hand and committed to docs/performance.md, never asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

from tests.benchmarks.test_cli import BENCHMARKS, load


def test_rounds_rotate_the_order_and_time_every_variant_once_per_round():
    interleaved = load("step_time").interleaved
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = interleaved.interleave(steps, rounds=4, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: len(ms) for name, ms in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert interleaved.ratio({"p": [2.0, 9.0, 3.0], "f": [1.0, 3.0, 3.0]}, "p", "f") == 2.0


def test_a_variant_that_cannot_be_built_fails_its_row_with_the_reason(monkeypatch):
    interleaved = load("step_time").interleaved

    def prepare(name, batch, variant):
        raise RuntimeError(f"no {variant} today")

    monkeypatch.setattr(interleaved, "prepare", prepare)
    r = interleaved.measure("mlp", 4, rounds=2, variants=["privgrad"], max_gb=1.0)
    assert "nonprivate could not be built: RuntimeError: no nonprivate today" in r["error"]
    assert interleaved.row(r).startswith("| mlp | 4 | fail: nonprivate could not be built")


def test_the_in_process_table_on_tiny_settings():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(BENCHMARKS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_time.py"), "--in-process", "--models", "mlp,bag",
         "--batches", "2", "--rounds", "2", "--threads", "1", "--max-psg-gb", "0.01",
         "--variants", "privgrad,opacus-ew"],
        check=False, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "# mode: in-process, interleaved" in out and "2 rounds" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith(("| mlp ", "| bag "))}
    cells = [c.strip() for c in rows["mlp"].split("|")[1:-1]]
    assert cells[5].endswith("(ew)")  # Opacus's mode ran on the MLP (0.001 GB per example set)
    assert all(re.fullmatch(r"[+-]?\d+\.\d+", c) for c in cells[6:])  # x np, floor, opacus, ms
    assert "none ran" in rows["bag"]  # too large for 0.01 GB: said in the row and the notes
    assert "- bag B=2 Opacus probe: ew skip: per-sample gradients" in out


def test_a_row_without_opacus_says_why(monkeypatch):
    interleaved = load("step_time").interleaved
    steps = {"nonprivate": 0.001, "floor": 0.002, "privgrad": 0.003}

    def prepare(name, batch, variant):
        return SimpleNamespace(step=lambda: time.sleep(steps[variant]))  # (never 0 ms)

    monkeypatch.setattr(interleaved, "prepare", prepare)
    r = interleaved.measure("mlp", 4, rounds=3, variants=["privgrad"], max_gb=1.0)
    cells = [c.strip() for c in interleaved.row(r).split("|")[1:-1]]
    assert cells[5] == "not asked (--variants)" and cells[8] == "-"
    float(cells[6]), float(cells[7]), float(cells[9])  # x np, x floor, ms over the floor
