"""PrivacyLogger across a resume: the CSV and TensorBoard continue, and epsilon is computed at an
interval, not every step (a PLD query costs 10-200 ms whenever the step count is new)."""

from __future__ import annotations

import csv
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from privgrad.errors import ConfigError
from privgrad.monitoring import PrivacyLogger
from privgrad.monitoring.logger import EPSILON_EVERY

DELTA = 1e-5


def read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def train(run, log, steps, **metrics):
    """``steps`` steps of ``run``, each logged."""
    for _ in range(steps):
        run.step(next(iter(run.loader)))
        log.log(loss=1.0, **metrics)


def checkpoint_then_crash(tiny_run, path, at=4, crash=7, **log_kwargs):
    """A first run that logs ``crash`` steps and had saved its engine state at step ``at``."""
    run = tiny_run()
    with PrivacyLogger(run.engine, DELTA, csv_path=path, epsilon_every=1, **log_kwargs) as log:
        train(run, log, at)
        state = run.engine.state_dict()
        train(run, log, crash - at)
    return state


def test_a_resumed_run_continues_the_csv(tiny_run, tmp_path):
    path = tmp_path / "log.csv"
    state = checkpoint_then_crash(tiny_run, path)
    first = read(path)
    resumed = tiny_run()
    resumed.engine.load_state_dict(state)
    with PrivacyLogger(resumed.engine, DELTA, csv_path=path, epsilon_every=1) as log:
        train(resumed, log, 5)
    rows = read(path)
    assert [int(r["step"]) for r in rows] == list(range(1, 10))  # 5-7 of the crashed run replaced
    assert rows[:4] == first[:4]
    assert float(rows[-1]["epsilon"]) == pytest.approx(resumed.engine.get_epsilon(DELTA))


def test_a_fresh_run_starts_the_file_anew(tiny_run, tmp_path):
    path = tmp_path / "log.csv"
    checkpoint_then_crash(tiny_run, path)
    run = tiny_run()
    with PrivacyLogger(run.engine, DELTA, csv_path=path) as log:
        train(run, log, 2)
    assert [int(r["step"]) for r in read(path)] == [1, 2]


def test_a_row_cut_short_by_the_crash_is_dropped(tiny_run, tmp_path):
    path = tmp_path / "log.csv"
    state = checkpoint_then_crash(tiny_run, path, at=4, crash=4)
    with path.open("a") as f:
        f.write("5,0.1")  # the crash hit mid-row
    resumed = tiny_run()
    resumed.engine.load_state_dict(state)
    with PrivacyLogger(resumed.engine, DELTA, csv_path=path, epsilon_every=1) as log:
        train(resumed, log, 1)
    assert [int(r["step"]) for r in read(path)] == [1, 2, 3, 4, 5]
    assert all(None not in r.values() for r in read(path))


def test_continuing_needs_the_same_columns(tiny_run, tmp_path):
    path = tmp_path / "log.csv"
    state = checkpoint_then_crash(tiny_run, path)
    resumed = tiny_run()
    resumed.engine.load_state_dict(state)
    log = PrivacyLogger(resumed.engine, DELTA, csv_path=path)
    resumed.step(next(iter(resumed.loader)))
    with pytest.raises(ConfigError, match=(
            r"a continued CSV must have this logger's columns \[.*'lr'\]; got columns=\[.*'loss'\] in "
            r"'.*log.csv'\. Log the same metrics as the first run, pass a new csv_path, or delete")):
        log.log(loss=1.0, lr=0.1)
    assert len(read(path)) == 7  # nothing was lost


def test_a_file_that_is_not_a_log_is_refused(tiny_run, tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("name,value\na,1\n")
    run = tiny_run()
    log = PrivacyLogger(run.engine, DELTA, csv_path=path)
    run.step(next(iter(run.loader)))
    with pytest.raises(ConfigError, match=r"csv_path must be a PrivacyLogger CSV to be continued; got "
                                          r"csv_path='.*notes.csv' with columns \['name', 'value'\]\. Pass a new"):
        log.log(loss=1.0)
    assert path.read_text() == "name,value\na,1\n"


def test_tensorboard_replaces_the_steps_logged_past_the_checkpoint(tiny_run, tmp_path):
    state = checkpoint_then_crash(tiny_run, tmp_path / "log.csv", tensorboard_dir=tmp_path / "tb")
    resumed = tiny_run()
    resumed.engine.load_state_dict(state)
    with PrivacyLogger(resumed.engine, DELTA, tensorboard_dir=tmp_path / "tb", epsilon_every=1) as log:
        assert log.writer is None  # opened at the first log, at that step
        train(resumed, log, 2)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    epsilon = events.Scalars("privacy/epsilon")
    assert [e.step for e in epsilon] == [1, 2, 3, 4, 5, 6]
    assert epsilon[-1].value == pytest.approx(resumed.engine.get_epsilon(DELTA), rel=1e-6)


def test_epsilon_is_computed_every_tenth_step_by_default(tiny_run, monkeypatch):
    run = tiny_run()
    asked = []
    real = run.engine.get_epsilon
    monkeypatch.setattr(run.engine, "get_epsilon", lambda delta: asked.append(run.engine.steps) or real(delta))
    log = PrivacyLogger(run.engine, DELTA)
    rows = []
    for _ in range(2 * EPSILON_EVERY + 1):
        run.step(next(iter(run.loader)))
        rows.append(log.log(loss=1.0))
    assert EPSILON_EVERY == 10
    assert asked == [10, 20]
    assert [r["step"] for r in rows if not math.isnan(r["epsilon"])] == [10, 20]
