"""A small logger hook: epsilon, clip fraction, noise and loss per step, to CSV and TensorBoard,
and a progress bar that shows epsilon live and ends on the final epsilon.

A resumed run continues its log: the CSV keeps the rows of the steps before the first step
logged now and drops the later ones (a crashed run may have logged past its last checkpoint),
and TensorBoard purges those steps the same way. Epsilon is computed every ``epsilon_every``
(default 10) steps, since a PLD query costs 10-200 ms whenever the step count is new.

>>> log = PrivacyLogger(engine, delta=1e-5, csv_path="runs/log.csv")   # doctest: +SKIP
>>> for x, y in progress(train_loader, engine, delta=1e-5):             # doctest: +SKIP
...     optimizer.zero_grad(); loss = criterion(model(x), y); loss.backward(); optimizer.step()
...     log.log(loss=loss.item())
>>> log.close()                                                          # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from privgrad import _validate
from privgrad._install import install_hint
from privgrad.errors import ConfigError, PrivacyStateError

__all__ = ["PrivacyLogger", "progress", "step_record"]

FIELDS = ("step", "epsilon", "delta", "noise_multiplier", "noise_std", "max_grad_norm",
          "sample_rate", "examples", "clip_fraction", "loss")
#: Default of ``PrivacyLogger(epsilon_every=)``: a PLD query costs 10-200 ms whenever the step
#: count is new (every step for the first 256, then at each point of its step grid).
EPSILON_EVERY = 10


def step_record(engine, delta: float | None = None) -> dict:
    """The last step's numbers: settings, epsilon (if ``delta`` is given) and clip statistics.

    ``clip_fraction`` is the share of the step's examples whose gradient norm exceeded
    ``max_grad_norm`` (``nan`` for an empty batch; automatic clipping: whose gradient it shrank).
    Under adaptive clipping ``max_grad_norm`` and ``noise_std`` are the last step's (the bound
    moves; per-layer: their root-sum-of-squares), and ``quantile_estimate`` is the step's released
    estimate of the share within it (per-layer: the mean over the layers).

    Privacy:
        ``epsilon``, the noise and the settings are public. ``examples``, ``clip_fraction`` (and
        any loss you add) are computed from the private batch *without* noise: the guarantee does
        not cover them. Keep such logs with the private data, or leave them out.
    """
    if engine.settings is None:
        raise PrivacyStateError("logging needs an engine with privacy settings; got an engine "
                                "before make_private. Call engine.make_private(...) first.")
    s, stats = engine.settings, engine.last_step_stats
    adaptive = engine.adaptive_clipping  # its bound moves: the one the last step used
    bound = s.total_bound
    if adaptive is not None and adaptive.bounds:
        bound = math.hypot(*adaptive.bounds[-1]) if adaptive.per_layer else adaptive.bounds[-1]
    examples = stats.examples if stats is not None else 0
    record = dict(
        step=engine.steps,
        epsilon=engine.get_epsilon(delta) if delta is not None else math.nan,
        delta=delta if delta is not None else math.nan,
        noise_multiplier=s.noise_multiplier, noise_std=s.gradient_noise_multiplier * bound,
        max_grad_norm=bound,
        sample_rate=s.sample_rate, examples=examples,
        clip_fraction=stats.clipped / examples if examples else math.nan,
    )
    if adaptive is not None:  # per-layer: the mean of the layers' estimates
        last = adaptive.estimates[-1] if adaptive.estimates else math.nan
        record["quantile_estimate"] = (sum(last) / len(last)) if adaptive.per_layer and adaptive.estimates else last
    return record


class PrivacyLogger:
    """Writes one row per logged step to a CSV file and/or TensorBoard.

    Call [`log()`][privgrad.monitoring.logger.PrivacyLogger.log] after ``optimizer.step()``.
    Columns:
    ``step, epsilon, delta, noise_multiplier, noise_std, max_grad_norm, sample_rate, examples, clip_fraction, loss``
    and any extra keyword given to [`log()`][privgrad.monitoring.logger.PrivacyLogger.log] (the
    first row fixes the columns).

    Args:
        engine: a [`PrivacyEngine`][privgrad.PrivacyEngine] after ``make_private``.
        delta: the delta epsilon is reported at.
        csv_path: file to write (its folder is created); ``None`` for no CSV. An existing file
            is continued, not overwritten: its rows of steps before the first step this logger
            writes are kept (a run resumed from a checkpoint at step 100 keeps rows 1-100),
            later ones are dropped. A fresh run, whose first step is 1, thus starts the file
            anew. Kept rows must have this logger's columns.
        tensorboard_dir: folder for a ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard``
            extra), opened at the first [`log()`][privgrad.monitoring.logger.PrivacyLogger.log] with
            ``purge_step`` at that step, so a resumed run replaces the events it logged past its
            checkpoint; ``None`` for none.
        writer: any object with ``add_scalar(tag, value, step)`` (e.g. your own SummaryWriter)
            instead of ``tensorboard_dir``.
        epsilon_every: compute epsilon every this many steps (default ``EPSILON_EVERY``);
            other rows leave it empty. A PLD query costs 10-200 ms whenever the step count is
            new; ``1`` is cheap with the RDP accountant. The final value is
            ``engine.get_epsilon(delta)``.

    Privacy:
        See [`step_record()`][privgrad.monitoring.logger.step_record]: the loss and the clip
        statistics are not private releases.
    """

    def __init__(self, engine, delta: float, csv_path: str | Path | None = None,
                 tensorboard_dir: str | Path | None = None, writer=None,
                 epsilon_every: int = EPSILON_EVERY):
        self.engine = engine
        self.delta = _validate.open_unit("delta", delta, "Pass a delta well below 1/N, e.g. 1e-5.")
        self.epsilon_every = _validate.positive_int(
            "epsilon_every", epsilon_every, "Pass how often to compute epsilon, e.g. 1 or 10.")
        if tensorboard_dir is not None and writer is not None:
            raise _validate.fail("pass tensorboard_dir or writer, not both", "writer", writer,
                                 "Drop one of them.")
        self.writer = writer
        self._open_writer = _summary_writer(tensorboard_dir)  # called at the first log
        self._owns_writer = self._open_writer is not None
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self._file = self._csv = None
        self._columns: tuple[str, ...] | None = None
        self.rows = 0

    def log(self, loss: float | None = None, **metrics: float) -> dict:
        """Record the step just taken; returns the row written."""
        due = self.engine.steps % self.epsilon_every == 0
        row = step_record(self.engine, self.delta if due else None)
        if not due:
            row["delta"] = self.delta
        row["loss"] = math.nan if loss is None else float(loss)
        row.update(metrics)
        if self._columns is None:
            self._columns = FIELDS + tuple(k for k in row if k not in FIELDS)
        unknown = set(row) - set(self._columns)
        if unknown:
            raise ConfigError(
                f"every row must have the columns of the first; got new keys {sorted(unknown)}. "
                f"Pass the same keyword metrics to every log() call.")
        self._write_csv(row)
        if self._open_writer is not None:
            self.writer, self._open_writer = self._open_writer(row["step"]), None
        if self.writer is not None:
            for key in self._columns:
                if key != "step" and isinstance(row.get(key), (int, float)) and not math.isnan(row[key]):
                    self.writer.add_scalar(f"privacy/{key}", row[key], row["step"])
        self.rows += 1
        return row

    def _write_csv(self, row: dict) -> None:
        if self.csv_path is None:
            return
        if self._csv is None:
            self._continue_csv(row["step"])
        self._csv.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                            for k, v in row.items()})
        self._file.flush()

    def _continue_csv(self, first_step: int) -> None:
        """Rewrite the file with its rows before ``first_step``, then append to it."""
        path = self.csv_path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = _rows_before(path, first_step, self._columns)
        partial = path.with_name(path.name + ".tmp")  # a crash now never loses the kept rows
        with open(partial, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=self._columns)
            out.writeheader()
            out.writerows(kept)
        partial.replace(path)
        self._file = open(path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self._columns)

    def close(self) -> None:
        """Close the CSV file (and the TensorBoard writer this logger created)."""
        if self._file is not None:
            self._file.close()
            self._file = self._csv = None
        if self._owns_writer and self.writer is not None:
            self.writer.close()
        self._owns_writer = False
        self._open_writer = None

    def __enter__(self) -> PrivacyLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rows_before(path: Path, first_step: int, columns: tuple[str, ...]) -> list[dict]:
    """The rows of an existing log at steps before ``first_step`` (none if there is no file).

    A row cut short by a crash (missing fields) is dropped.

    Raises:
        ConfigError: the file is not a PrivacyLogger CSV, or rows to keep have other columns.
    """
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        rows = [r for r in reader if None not in r.values() and None not in r]
    if not header:
        return []
    fix = "Pass a new csv_path, or delete the file to start it anew."
    try:
        kept = [r for r in rows if int(r["step"]) < first_step]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"csv_path must be a PrivacyLogger CSV to be continued; got csv_path="
                          f"{str(path)!r} with columns {list(header)}. {fix}") from e
    if kept and header != columns:
        raise ConfigError(
            f"a continued CSV must have this logger's columns {list(columns)}; got columns="
            f"{list(header)} in {str(path)!r}. Log the same metrics as the first run, pass a new "
            f"csv_path, or delete the file to start it anew.")
    return kept


def _summary_writer(log_dir) -> Callable[[int], object] | None:
    """A function opening the SummaryWriter at the first logged step (``None`` if no folder)."""
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            f"tensorboard_dir needs the tensorboard package; got tensorboard_dir={str(log_dir)!r} "
            f"without it. Install it: {install_hint('tensorboard')}; or log to csv_path only.") from e
    return lambda first_step: SummaryWriter(log_dir=str(log_dir), purge_step=first_step)


def progress(iterable: Iterable, engine, delta: float, *, every_s: float = 1.0,
             **tqdm_kwargs) -> Iterator:
    """Iterate ``iterable`` under a tqdm bar whose postfix shows the epsilon spent so far.

    Epsilon is recomputed after a step at most every ``every_s`` seconds (the last value shown is
    always for a step already taken). When the loop ends, or is left with ``break`` (a budget
    stop), the bar shows the epsilon after the last step before it closes.
    """
    from tqdm.auto import tqdm

    delta = _validate.open_unit("delta", delta, "Pass a delta well below 1/N, e.g. 1e-5.")
    bar = tqdm(iterable, **tqdm_kwargs)
    last, shown = -math.inf, None  # when, and after which step, epsilon was last shown

    def show() -> int:
        bar.set_postfix(epsilon=f"{engine.get_epsilon(delta):.3f}", refresh=False)
        return engine.steps

    try:
        for item in iterable:  # not the bar: it would close itself before the last epsilon
            yield item
            bar.update(1)
            now = time.monotonic()
            if now - last >= every_s:
                shown, last = show(), now
    except GeneratorExit:  # the caller left the loop early, done with the item it holds
        bar.update(1)
        if shown != engine.steps:
            show()
        raise
    else:
        if shown != engine.steps:
            show()
    finally:
        bar.close()
