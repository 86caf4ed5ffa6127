"""A small logger hook: epsilon, clip fraction, noise and loss per step, to CSV and TensorBoard,
and a progress bar that shows epsilon live.

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
from collections.abc import Iterable, Iterator
from pathlib import Path

from privgrad import _validate
from privgrad.errors import ConfigError, PrivacyStateError

__all__ = ["PrivacyLogger", "progress", "step_record"]

FIELDS = ("step", "epsilon", "delta", "noise_multiplier", "noise_std", "max_grad_norm",
          "sample_rate", "examples", "clip_fraction", "loss")


def step_record(engine, delta: float | None = None) -> dict:
    """The last step's numbers: settings, epsilon (if ``delta`` is given) and clip statistics.

    ``clip_fraction`` is the share of the step's examples whose gradient norm exceeded
    ``max_grad_norm`` (``nan`` for an empty batch).

    Privacy:
        ``epsilon``, the noise and the settings are public. ``examples``, ``clip_fraction`` (and
        any loss you add) are computed from the private batch *without* noise: the guarantee does
        not cover them. Keep such logs with the private data, or leave them out.
    """
    if engine.settings is None:
        raise PrivacyStateError("logging needs an engine with privacy settings; got an engine "
                                "before make_private. Call engine.make_private(...) first.")
    s, stats = engine.settings, engine.last_step_stats
    examples = stats.examples if stats is not None else 0
    record = dict(
        step=engine.steps,
        epsilon=engine.get_epsilon(delta) if delta is not None else math.nan,
        delta=delta if delta is not None else math.nan,
        noise_multiplier=s.noise_multiplier, noise_std=s.noise_std, max_grad_norm=s.total_bound,
        sample_rate=s.sample_rate, examples=examples,
        clip_fraction=stats.clipped / examples if examples else math.nan,
    )
    return record


class PrivacyLogger:
    """Writes one row per logged step to a CSV file and/or TensorBoard.

    Call :meth:`log` after ``optimizer.step()``. Columns: ``step, epsilon, delta,
    noise_multiplier, noise_std, max_grad_norm, sample_rate, examples, clip_fraction, loss`` and
    any extra keyword given to :meth:`log` (the first row fixes the columns).

    Args:
        engine: a :class:`~privgrad.PrivacyEngine` after ``make_private``.
        delta: the delta epsilon is reported at.
        csv_path: file to write (its folder is created); ``None`` for no CSV.
        tensorboard_dir: folder for a ``torch.utils.tensorboard.SummaryWriter`` (needs the
            ``tensorboard`` package); ``None`` for none.
        writer: any object with ``add_scalar(tag, value, step)`` (e.g. your own SummaryWriter)
            instead of ``tensorboard_dir``.
        epsilon_every: compute epsilon every this many steps (the PLD accountant takes about
            0.2 s a query); other rows leave it empty.

    Privacy:
        See :func:`step_record`: the loss and the clip statistics are not private releases.
    """

    def __init__(self, engine, delta: float, csv_path: str | Path | None = None,
                 tensorboard_dir: str | Path | None = None, writer=None, epsilon_every: int = 1):
        self.engine = engine
        self.delta = _validate.open_unit("delta", delta, "Pass a delta well below 1/N, e.g. 1e-5.")
        self.epsilon_every = _validate.positive_int(
            "epsilon_every", epsilon_every, "Pass how often to compute epsilon, e.g. 1 or 10.")
        if tensorboard_dir is not None and writer is not None:
            raise _validate.fail("pass tensorboard_dir or writer, not both", "writer", writer,
                                 "Drop one of them.")
        self.writer = writer if writer is not None else _summary_writer(tensorboard_dir)
        self._owns_writer = writer is None and self.writer is not None
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
            self._columns = FIELDS + tuple(k for k in metrics if k not in FIELDS)
        unknown = set(row) - set(self._columns)
        if unknown:
            raise ConfigError(
                f"every row must have the columns of the first; got new keys {sorted(unknown)}. "
                f"Pass the same keyword metrics to every log() call.")
        self._write_csv(row)
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
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.csv_path, "w", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=self._columns)
            self._csv.writeheader()
        self._csv.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                            for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        """Close the CSV file (and the TensorBoard writer this logger created)."""
        if self._file is not None:
            self._file.close()
            self._file = self._csv = None
        if self._owns_writer:
            self.writer.close()
            self._owns_writer = False

    def __enter__(self) -> PrivacyLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summary_writer(log_dir):
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            f"tensorboard_dir needs the tensorboard package; got tensorboard_dir={str(log_dir)!r} "
            f"without it. pip install tensorboard, or log to csv_path only.") from e
    return SummaryWriter(log_dir=str(log_dir))


def progress(iterable: Iterable, engine, delta: float, *, every_s: float = 1.0,
             **tqdm_kwargs) -> Iterator:
    """Iterate ``iterable`` under a tqdm bar whose postfix shows the epsilon spent so far.

    Epsilon is recomputed after a step at most every ``every_s`` seconds (the last value shown is
    always for a step already taken).
    """
    from tqdm.auto import tqdm

    delta = _validate.open_unit("delta", delta, "Pass a delta well below 1/N, e.g. 1e-5.")
    bar = tqdm(iterable, **tqdm_kwargs)
    last = -math.inf
    try:
        for item in bar:
            yield item
            now = time.monotonic()
            if now - last >= every_s:
                bar.set_postfix(epsilon=f"{engine.get_epsilon(delta):.3f}", refresh=False)
                last = now
    finally:
        bar.close()
