import csv
import io
import math
import re
import sys

import pytest

from privgrad import PrivacyEngine
from privgrad._install import install_hint
from privgrad.errors import ConfigError, PrivacyStateError
from privgrad.monitoring import PrivacyLogger, progress, step_record

DELTA = 1e-5


class FakeWriter:
    def __init__(self):
        self.scalars = []
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_csv_has_one_row_per_step_with_the_engine_numbers(tiny_run, tmp_path):
    run = tiny_run(max_grad_norm=1e-6)  # every gradient is larger: all examples clipped
    path = tmp_path / "sub" / "log.csv"
    epsilons = []
    with PrivacyLogger(run.engine, DELTA, csv_path=path, epsilon_every=1) as log:
        for batch in run.loader:
            loss = run.step(batch)
            row = log.log(loss=loss, lr=0.1)
            epsilons.append(run.engine.get_epsilon(DELTA))
            assert row["loss"] == loss
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(epsilons) == run.engine.steps
    assert list(rows[0]) == ["step", "epsilon", "delta", "noise_multiplier", "noise_std",
                             "max_grad_norm", "sample_rate", "examples", "clip_fraction", "loss", "lr"]
    assert [float(r["epsilon"]) for r in rows] == pytest.approx(epsilons)
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(float(r["clip_fraction"]) == 1.0 for r in rows if int(r["examples"]) > 0)
    assert float(rows[0]["noise_std"]) == pytest.approx(1e-6)


def test_clip_fraction_is_zero_under_a_loose_bound(tiny_run):
    run = tiny_run(max_grad_norm=1e6)
    run.step(next(iter(run.loader)))
    record = step_record(run.engine, DELTA)
    assert record["examples"] == run.engine.last_step_stats.examples > 0
    assert record["clip_fraction"] == 0.0


def test_writer_gets_scalars_and_epsilon_every(tiny_run):
    run = tiny_run()
    writer = FakeWriter()
    log = PrivacyLogger(run.engine, DELTA, writer=writer, epsilon_every=2)
    rows = []
    for batch in run.loader:  # four batches an epoch (q = 1/4)
        run.step(batch)
        rows.append(log.log(loss=1.0))
    log.close()
    assert [math.isnan(r["epsilon"]) for r in rows] == [True, False, True, False]
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"privacy/epsilon", "privacy/clip_fraction", "privacy/loss", "privacy/noise_std"} <= tags
    assert [s for t, _, s in writer.scalars if t == "privacy/epsilon"] == [2, 4]
    assert not writer.closed  # the caller's writer stays open


def test_tensorboard_without_the_package_says_what_to_install(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=re.escape(
            f"tensorboard_dir needs the tensorboard package; got tensorboard_dir='{tmp_path}' without "
            f"it. Install it: {install_hint('tensorboard')}; or log to csv_path only.")):
        PrivacyLogger(tiny_run().engine, DELTA, tensorboard_dir=tmp_path)


def test_rows_keep_their_columns(tiny_run):
    run = tiny_run()
    log = PrivacyLogger(run.engine, DELTA)
    run.step(next(iter(run.loader)))
    log.log(loss=1.0)
    with pytest.raises(ConfigError, match=r"every row must have the columns of the first; got new keys \['acc'\]"):
        log.log(loss=1.0, acc=0.5)


def test_logging_before_make_private_is_an_error():
    with pytest.raises(PrivacyStateError, match="before make_private"):
        step_record(PrivacyEngine(), DELTA)


def test_progress_bar_shows_live_epsilon(tiny_run):
    run = tiny_run()
    out = io.StringIO()
    seen = 0
    for batch in progress(run.loader, run.engine, DELTA, every_s=0.0, file=out, mininterval=0):
        run.step(batch)
        seen += 1
    assert seen == run.engine.steps > 0
    shown = out.getvalue()
    assert f"epsilon={run.engine.get_epsilon(DELTA):.3f}" in shown


def test_progress_bar_ends_on_the_final_epsilon(tiny_run):
    """Epsilon is shown at most every every_s seconds; the bar still closes on the last step's."""
    run = tiny_run()
    out = io.StringIO()
    for batch in progress(run.loader, run.engine, DELTA, every_s=1e9, file=out, mininterval=0):
        run.step(batch)
    assert run.engine.steps > 1
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert f"epsilon={run.engine.get_epsilon(DELTA):.3f}" in last


def test_progress_bar_left_early_ends_on_the_epsilon_spent(tiny_run):
    run = tiny_run(noise_multiplier=0.5)
    out = io.StringIO()
    for i, batch in enumerate(progress(run.loader, run.engine, DELTA, every_s=1e9, file=out,
                                       mininterval=0)):
        run.step(batch)
        if i == 2:
            break  # as a budget stop does
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert run.engine.steps == 3
    assert f"epsilon={run.engine.get_epsilon(DELTA):.3f}" in last
