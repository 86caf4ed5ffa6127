"""Budget tools: the noise a target epsilon needs, and the steps or epochs a budget allows.

All searches evaluate the chosen accountant itself and return a value whose epsilon was
*computed* to be within the target, so they never overshoot. This module imports no torch, and
SciPy only when a search runs.
"""

from __future__ import annotations

import math
from functools import lru_cache

from privgrad import _validate
from privgrad.accounting.accountant import check_delta
from privgrad.accounting.events import (
    PoissonGaussian,
    Repeated,
    _check_event,
    check_noise_multiplier,
    check_sample_rate,
)
from privgrad.accounting.kinds import ACCOUNTANTS, DEFAULT_ACCOUNTANT, make_accountant
from privgrad.errors import PrivacyBudgetError

__all__ = ["epsilon_for", "get_noise_multiplier", "get_max_steps", "get_max_epochs", "MAX_NOISE_MULTIPLIER"]

#: The largest noise multiplier ``get_noise_multiplier()`` will consider.
MAX_NOISE_MULTIPLIER = 1e4
#: Relative precision of the returned noise multiplier (0.5% is promised).
NOISE_RTOL = 1e-3
#: Below this noise multiplier the search gives up looking for less noise.
MIN_NOISE_MULTIPLIER = 1e-3
#: The largest step count ``get_max_steps()`` searches.
MAX_STEPS = 10**8


def _check_target_epsilon(target_epsilon: object) -> float:
    return _validate.positive("target_epsilon", target_epsilon, "Pass the privacy budget, e.g. 3.0.")


def _check_accountant(accountant: object) -> str:
    return _validate.choice("accountant", accountant, ACCOUNTANTS)


def epsilon_for(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Epsilon after ``steps`` identical DP-SGD steps (a fresh accountant each call)."""
    acc = make_accountant(accountant)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
    return acc.get_epsilon(delta)


def _checked_prior(prior):
    """``prior`` (what was spent before the steps searched), checked to be an event."""
    if prior is not None:
        _check_event("prior", prior)
    return prior


def _total_epsilon(name: str, delta: float, *events) -> float:
    """Epsilon of ``events`` (``None`` skipped) composed in a fresh ``name`` accountant; 0.0
    for none."""
    acc = make_accountant(name)
    for event in events:
        if event is not None:
            acc.compose(event)
    return acc.get_epsilon(delta)


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
    event=None,
    prior=None,
) -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps meets the target.

    Args:
        target_epsilon: the epsilon to reach, > 0.
        target_delta: the delta it is stated at, in (0, 1).
        sample_rate: Poisson sample rate of every step, in (0, 1].
        steps: number of steps, an integer >= 1.
        accountant: ``"pld"`` (default) or ``"rdp"``.
        event: ``noise_multiplier -> event`` of one step, for steps that are not the plain
            Poisson-subsampled Gaussian (truncated sampling's ``SamplingPlan.event``); default
            ``PoissonGaussian(noise_multiplier, sample_rate)``.
        prior: what was spent before these steps (an event, e.g. an accountant's ``event``:
            a release of noisy statistics, an earlier phase of training), composed first, so
            that the *total* stays within the target; default nothing.

    Returns:
        ``noise_multiplier`` with ``epsilon <= target_epsilon`` as computed by ``accountant``,
        and within about 0.1% of the smallest such value (Brent's method on log sigma). A tiny
        target is searched like any other: with enough noise the PLD accountant's epsilon
        reaches exactly 0 (``target_delta`` alone then covers the mechanism). The RDP
        accountant's conversion has a floor (about 0.0035 at ``target_delta = 1e-5``, from its
        largest order, 1024): a target below it raises, and the message names PLD.

    Raises:
        ConfigError: an argument out of range.
        PrivacyBudgetError: even ``noise_multiplier = 1e4`` does not reach the target, or
            ``prior`` alone spends it.

    Privacy:
        The result is checked, not extrapolated: its epsilon was computed and is within the
        target. Use the same accountant for training as for calibration.
    """
    target = _check_target_epsilon(target_epsilon)
    delta = check_delta(target_delta, "target_delta")
    q = check_sample_rate(sample_rate)
    steps = _validate.positive_int("steps", steps, "Pass the number of training steps, e.g. epochs / sample_rate.")
    name = _check_accountant(accountant)
    step = event if event is not None else (lambda sigma: PoissonGaussian(sigma, q))
    spent = _total_epsilon(name, delta, _checked_prior(prior))
    if spent >= target:
        raise PrivacyBudgetError(
            f"target_epsilon must be larger than what was already spent; got "
            f"target_epsilon={target_epsilon!r} with epsilon={spent:.4g} spent before these "
            f"steps (at target_delta={target_delta!r}, {name} accountant). Raise "
            f"target_epsilon (it is the total), or spend less before training.")

    @lru_cache(maxsize=None)
    def eps(sigma: float) -> float:
        return _total_epsilon(name, delta, prior, Repeated(step(sigma), steps))

    if eps(MAX_NOISE_MULTIPLIER) > target:
        floor = (" (the RDP accountant's conversion cannot certify epsilon below about "
                 f"{eps(MAX_NOISE_MULTIPLIER):.2g} here; accountant='pld' may reach lower)") if name == "rdp" else ""
        raise PrivacyBudgetError(
            f"target_epsilon must be reachable with noise_multiplier <= {MAX_NOISE_MULTIPLIER:g}; "
            f"got target_epsilon={target_epsilon!r} (with target_delta={target_delta!r}, sample_rate={sample_rate!r}, "
            f"steps={steps!r}){floor}. Raise target_epsilon or target_delta, or lower sample_rate or steps."
        )
    # Bracket the root of log eps(sigma) = log target in log sigma, growing from sigma = 1.
    hi = 1.0
    while hi < MAX_NOISE_MULTIPLIER and eps(hi) > target:
        hi = min(hi * 4, MAX_NOISE_MULTIPLIER)
    lo = hi / 4
    while eps(lo) <= target:
        if lo < MIN_NOISE_MULTIPLIER:
            return lo  # even (almost) no noise meets the target
        hi, lo = lo, lo / 4

    def excess(log_sigma: float) -> float:
        # log(eps / target), clamped: eps is inf without noise and exactly 0 once delta alone
        # covers the mechanism (large noise, tiny targets); only the sign matters at the ends.
        value = eps(math.exp(log_sigma))
        if value == 0:
            return -1e3
        return math.log(value / target) if value < math.inf else 1e3

    from scipy import optimize

    xtol = math.log1p(NOISE_RTOL) / 4
    root = optimize.brentq(excess, math.log(lo), math.log(hi), xtol=xtol, rtol=1e-12)
    # brentq's root is within xtol of the crossing; step above it until epsilon is in budget.
    sigma = math.exp(root + xtol)
    while eps(sigma) > target:
        sigma = min(sigma * (1 + NOISE_RTOL / 4), hi)
    return sigma


def get_max_steps(
    *,
    target_epsilon: float,
    target_delta: float,
    noise_multiplier: float,
    sample_rate: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    prior=None,
) -> int:
    """The largest number of steps whose epsilon stays within ``target_epsilon``.

    Returns 0 if even one step exceeds the target. ``prior``: what was spent before these
    steps (an event, e.g. an accountant's ``event``), counted in the total.

    Raises:
        ConfigError: an argument out of range.
        PrivacyBudgetError: the budget allows more than ``MAX_STEPS`` steps.

    Privacy:
        The returned count was checked with ``accountant``; one more step would exceed the
        target.
    """
    target = _check_target_epsilon(target_epsilon)
    delta = check_delta(target_delta, "target_delta")
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    name = _check_accountant(accountant)
    prior = _checked_prior(prior)

    def fits(steps: int) -> bool:
        return _total_epsilon(name, delta, prior, Repeated(PoissonGaussian(sigma, q), steps)) <= target

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        if hi >= MAX_STEPS:
            raise PrivacyBudgetError(
                f"the budget must allow at most {MAX_STEPS} steps to be searched; got target_epsilon={target_epsilon!r} "
                f"with noise_multiplier={noise_multiplier!r}, sample_rate={sample_rate!r}. Lower target_epsilon or the noise."
            )
        lo, hi = hi, min(hi * 2, MAX_STEPS)
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def get_max_epochs(
    *,
    target_epsilon: float,
    target_delta: float,
    noise_multiplier: float,
    sample_rate: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    prior=None,
) -> float:
    """Expected epochs the budget allows (after ``prior``):
    [`get_max_steps()`][privgrad.accounting.calibration.get_max_steps] times ``sample_rate``."""
    steps = get_max_steps(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        accountant=accountant,
        prior=prior,
    )
    return steps * check_sample_rate(sample_rate)
