"""Budget stop: train "until the budget is spent", stopping before the step that would exceed it.

The engine's accountant knows the steps taken so far; a *copy* of it is stepped forward with the
engine's current ``noise_multiplier`` and ``sample_rate`` to find how many more steps fit within
``max_epsilon``. The answer is computed once (a binary search, about 20 accountant queries) and
reused until the accountant's history or the privacy settings change, so checking before every
step costs nothing.

>>> budget = BudgetStop(engine, max_epsilon=3.0, delta=1e-5)   # doctest: +SKIP
>>> for x, y in budget.batches(train_loader):                  # doctest: +SKIP
...     ...  # the ordinary step; the loop ends before a step would exceed epsilon=3
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from privgrad import _validate
from privgrad.accounting import HistoryEntry, make_accountant
from privgrad.accounting.calibration import MAX_STEPS
from privgrad.errors import PrivacyBudgetError, PrivacyStateError

__all__ = ["BudgetStop", "epsilon_after"]


def _forecast(engine, steps: int):
    """A copy of ``engine``'s accountant with ``steps`` more steps at its current settings."""
    acc = engine.accountant
    copy = make_accountant(acc.name)
    copy.load_state_dict(acc.state_dict())
    s = engine.settings
    copy.step(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate, num_steps=steps)
    return copy


def _check_attached(engine) -> None:
    if getattr(engine, "settings", None) is None:
        raise PrivacyStateError(
            "the budget needs an engine with privacy settings; got an engine before "
            "make_private. Call engine.make_private(...) first.")


def epsilon_after(engine, delta: float, steps: int = 1) -> float:
    """Epsilon the engine *would* have spent after ``steps`` more steps at its current settings.

    The engine and its accountant are not changed (a copy of the accountant is stepped).

    Privacy:
        Reads only the public settings and the step count; no data.
    """
    _check_attached(engine)
    delta = _validate.open_unit("delta", delta, "Pass a delta well below 1/N, e.g. 1e-5.")
    steps = _validate.nonnegative_int("steps", steps, "Pass how many future steps, e.g. 1.")
    return _forecast(engine, steps).get_epsilon(delta)


class BudgetStop:
    """Stops training cleanly before the first step whose epsilon would exceed ``max_epsilon``.

    Args:
        engine: a [`PrivacyEngine`][privgrad.PrivacyEngine] after ``make_private``.
        max_epsilon: the budget, > 0.
        delta: the delta at which the budget is stated.

    Use [`batches()`][privgrad.monitoring.budget.BudgetStop.batches] around the (Poisson) loader, so
    the loop simply ends, or ask [`exhausted`][privgrad.monitoring.budget.BudgetStop.exhausted] /
    [`check()`][privgrad.monitoring.budget.BudgetStop.check] before each step. The Lightning and
    Hugging Face integrations ask it for you.

    Privacy:
        Guarantees that, as long as every step is taken through
        [`batches()`][privgrad.monitoring.budget.BudgetStop.batches] or after
        [`check()`][privgrad.monitoring.budget.BudgetStop.check], the engine's accountant never
        reports more than ``max_epsilon`` at ``delta``: a step is allowed only if a copy of the
        accountant, stepped once more with the current settings, stays within budget. It assumes
        epsilon grows with every step (true for the RDP and PLD accountants) and that the settings
        do not change between the check and the step. Virtual batches: wrap the *logical* loader,
        not the physical chunks.
    """

    def __init__(self, engine, max_epsilon: float, delta: float):
        _check_attached(engine)
        self.engine = engine
        self.max_epsilon = _validate.positive("max_epsilon", max_epsilon,
                                              "Pass the privacy budget, e.g. 3.0.")
        self.delta = _validate.open_unit("delta", delta, "Pass a delta well below 1/N, e.g. 1e-5.")
        self._forecast_at = None  # (accountant history, (noise_multiplier, sample_rate))
        self._allowed = 0  # steps within budget after that history

    @property
    def steps_left(self) -> int:
        """How many more steps at the current settings stay within ``max_epsilon``."""
        s = self.engine.settings
        setting = (s.noise_multiplier, s.sample_rate)
        history = self.engine.accountant.history
        taken = self._steps_since_forecast(history, setting)
        if taken is None:  # first call, or the history/settings moved in an unforeseen way
            self._forecast_at, self._allowed, taken = (history, setting), self._search(), 0
        return max(0, self._allowed - taken)

    def _steps_since_forecast(self, history, setting) -> int | None:
        """Steps taken at ``setting`` since the forecast, or None if it no longer applies."""
        if self._forecast_at is None or self._forecast_at[1] != setting:
            return None
        before = self._forecast_at[0]
        taken = sum(e.num_steps for e in history) - sum(e.num_steps for e in before)
        if taken == 0:
            return 0 if history == before else None
        if before and tuple(before[-1][:2]) == setting:  # the accountant merges equal steps
            expected = before[:-1] + (before[-1]._replace(num_steps=before[-1].num_steps + taken),)
        else:
            expected = before + (HistoryEntry(*setting, taken),)
        return taken if history == expected else None

    @property
    def exhausted(self) -> bool:
        """True when even one more step would exceed ``max_epsilon``."""
        return self.steps_left == 0

    def check(self) -> None:
        """Raise [`PrivacyBudgetError`][privgrad.errors.PrivacyBudgetError] if the next step would
        exceed the budget (call it before ``optimizer.step()`` for a hard stop)."""
        if self.exhausted:
            spent = self.engine.accountant.get_epsilon(self.delta)
            raise PrivacyBudgetError(
                f"the next step must keep epsilon <= max_epsilon={self.max_epsilon:g} at "
                f"delta={self.delta:g}; got epsilon={spent:.4g} spent and "
                f"{epsilon_after(self.engine, self.delta):.4g} after one more step. Stop "
                f"training (loop over budget.batches(loader) to stop cleanly), or raise "
                f"max_epsilon.")

    def batches(self, loader: Iterable) -> Iterator:
        """Yield ``loader``'s batches while the next step fits the budget; then stop.

        Each batch is assumed to become one step (true for privgrad's Poisson loader).
        """
        for batch in loader:
            if self.exhausted:
                return
            yield batch

    def _fits(self, steps: int) -> bool:
        return _forecast(self.engine, steps).get_epsilon(self.delta) <= self.max_epsilon

    def _search(self) -> int:
        """The largest k with epsilon(history + k steps) <= max_epsilon (0 if none)."""
        if self.engine.accountant.get_epsilon(self.delta) > self.max_epsilon or not self._fits(1):
            return 0
        lo, hi = 1, 2
        while self._fits(hi):
            if hi >= MAX_STEPS:
                return MAX_STEPS
            lo, hi = hi, min(2 * hi, MAX_STEPS)
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._fits(mid) else (lo, mid)
        return lo

    def __repr__(self) -> str:
        return (f"BudgetStop(max_epsilon={self.max_epsilon:g}, delta={self.delta:g}, "
                f"steps_left={self.steps_left})")
