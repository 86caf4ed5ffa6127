"""What epsilon means: the hypothesis-testing trade-off curve of the best membership attack.

An attacker who sees everything a run released and must tell whether one record was in the
training set runs a hypothesis test. Its false-positive rate (FPR, alpha) and false-negative rate
(FNR, beta) cannot both be small: a run is *f-DP* (Dong, Roth and Su 2022, "Gaussian differential
privacy") when every such test has ``FNR >= f(FPR)``. The curve ``f`` says everything (epsilon,
delta) says and more; ``TPR = 1 - f(FPR)`` is the best attack's true-positive rate.

The accountant's privacy loss distribution (PLD) gives ``delta(epsilon)`` for every epsilon >= 0,
for both neighbouring directions (add and remove one record). A mechanism that is
``(epsilon, delta(epsilon))``-DP for every epsilon >= 0 is f-DP for the symmetric curve

    f(alpha) = max(0, sup_eps 1 - delta(eps) - e^eps alpha, sup_eps e^-eps (1 - delta(eps) - alpha))

(Dong, Roth and Su, Proposition 2.12: the supremum of the ``(epsilon, delta)`` curves, the
convex conjugate of the privacy profile). ``TradeOffCurve`` holds the profile on a grid of
epsilons and evaluates this supremum at any FPR. The Gaussian mechanism with noise multiplier
``sigma`` and no sampling is exactly ``mu = 1/sigma`` Gaussian-DP, with the closed form
``f(alpha) = Phi(Phi^-1(1 - alpha) - mu)`` (``gdp_tradeoff()``); its (epsilon, delta) follow
from Balle and Wang (2018) (``gdp_delta()``, ``gdp_epsilon()``).

This module imports no torch, and ``dp_accounting`` only through the accountant.

Privacy:
    Every number here errs towards more leakage: the PLD is discretised pessimistically (its
    delta is an upper bound), and a supremum over a finite grid of epsilons is below the
    supremum over all of them, so the curve is a lower bound on the true ``f`` and the TPRs are
    upper bounds on what any attack achieves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privgrad import _validate
from privgrad.accounting.accountant import Accountant, check_delta

__all__ = ["TradeOffCurve", "gdp_delta", "gdp_epsilon", "gdp_mu", "gdp_tradeoff", "tradeoff_curve"]

#: Epsilons of the profile's grid: dense where curves bend most (small epsilon), up to where
#: delta(epsilon) falls below ``_DELTA_FLOOR``.
_GRID_POINTS = 4000
_DELTA_FLOOR = 1e-15
_FLOORS = (_DELTA_FLOOR, 1e-12, 1e-9, 1e-6)


def _check_fpr(fpr: object) -> np.ndarray:
    a = np.asarray(fpr, dtype=np.float64)
    if a.size == 0 or not np.all((a >= 0) & (a <= 1)):
        raise _validate.fail("fpr must be in [0, 1]", "fpr", fpr, "Pass false-positive rates such as 0.01.")
    return a


def _check_mu(mu: object) -> float:
    return _validate.finite_nonnegative("mu", mu, "Pass the Gaussian-DP parameter, e.g. 1.0.")


def gdp_tradeoff(mu: float, fpr):
    """FNR of the best test at ``fpr`` against ``mu``-Gaussian-DP: ``Phi(Phi^-1(1 - fpr) - mu)``."""
    from scipy import special

    mu, a = _check_mu(mu), _check_fpr(fpr)
    out = special.ndtr(special.ndtri(1.0 - a) - mu)
    return float(out) if np.ndim(fpr) == 0 else out


def gdp_delta(mu: float, epsilon: float) -> float:
    """Delta of ``mu``-Gaussian-DP at ``epsilon`` (Balle & Wang 2018; Dong et al. Cor. 2.13):
    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``, computed in log space."""
    from scipy import special

    mu = _check_mu(mu)
    eps = _validate.finite_nonnegative("epsilon", epsilon, "Pass an epsilon >= 0.")
    if mu == 0:
        return 0.0
    a = special.log_ndtr(-eps / mu + mu / 2)
    b = eps + special.log_ndtr(-eps / mu - mu / 2)
    if b >= a:
        return 0.0
    return float(math.exp(a) * -math.expm1(b - a))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon at which ``mu``-Gaussian-DP is ``(epsilon, delta)``-DP."""
    from scipy import optimize

    mu, delta = _check_mu(mu), check_delta(delta)
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    hi = max(1.0, mu * mu)
    while gdp_delta(mu, hi) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-10, rtol=1e-12))


def gdp_mu(epsilon: float, delta: float) -> float:
    """The ``mu`` whose Gaussian-DP curve is ``(epsilon, delta)``-DP exactly (inverse of
    ``gdp_epsilon()``): the Gaussian mechanism with the same epsilon at ``delta``."""
    from scipy import optimize

    eps = _validate.finite_nonnegative("epsilon", epsilon, "Pass an epsilon >= 0.")
    delta = check_delta(delta)
    hi = 1.0
    while gdp_delta(hi, eps) < delta:
        hi *= 2
    return float(optimize.brentq(lambda m: gdp_delta(m, eps) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


@dataclass(frozen=True)
class TradeOffCurve:
    """The symmetric trade-off curve of a privacy profile ``delta(epsilon)``.

    Attributes:
        epsilons: ``(n,)`` increasing epsilons >= 0, starting at 0.
        deltas: ``(n,)`` the profile's delta at each (an upper bound on the true one).
        nonprivate: the run released something without noise: every test is perfect.
    """

    epsilons: np.ndarray
    deltas: np.ndarray
    nonprivate: bool = False

    def fnr(self, fpr):
        """The smallest FNR any test reaches at ``fpr`` (the curve ``f``), scalar or array."""
        a = _check_fpr(fpr)
        flat = a.reshape(-1)
        out = np.zeros_like(flat)
        if not self.nonprivate:
            e, d = self.epsilons.reshape(1, -1), self.deltas.reshape(1, -1)
            for start in range(0, flat.size, 256):  # bounded memory: 256 x grid at a time
                x = flat[start:start + 256].reshape(-1, 1)
                with np.errstate(over="ignore", invalid="ignore"):
                    grow = np.nan_to_num(np.exp(e) * x, nan=0.0)  # e^eps * 0 is 0, not NaN
                    upper = np.max(1.0 - d - grow, axis=1, initial=0.0)
                    lower = np.max(np.exp(-e) * (1.0 - d - x), axis=1, initial=0.0)
                out[start:start + 256] = np.maximum(upper, lower)
        out = np.clip(out, 0.0, 1.0 - flat).reshape(a.shape)
        return float(out) if np.ndim(fpr) == 0 else out

    def tpr(self, fpr):
        """The highest TPR any membership attack reaches at ``fpr``: ``1 - f(fpr)``."""
        out = 1.0 - np.asarray(self.fnr(fpr))
        return float(out) if np.ndim(fpr) == 0 else out

    @property
    def advantage(self) -> float:
        """The best attack's ``max(TPR - FPR)``: ``delta(0)``, the total-variation distance.
        With a prior of 1/2 it guesses membership right with probability ``(1 + advantage) / 2``."""
        return 1.0 if self.nonprivate else float(min(1.0, max(0.0, self.deltas[0])))


def _grid(top: float) -> np.ndarray:
    """Epsilons from 0 to ``top``: half of the points below ``top / 10``, where curves bend."""
    knee = top / 10
    low = np.linspace(0.0, knee, _GRID_POINTS // 2, endpoint=False)
    return np.concatenate([low, np.linspace(knee, top, _GRID_POINTS // 2)])


def _gaussian_curve(mu: float) -> TradeOffCurve:
    top = 1.0
    while gdp_delta(mu, top) > _DELTA_FLOOR:
        top *= 2
    eps = _grid(top)
    return TradeOffCurve(eps, np.array([gdp_delta(mu, e) for e in eps]))


def tradeoff_curve(accountant: Accountant) -> TradeOffCurve:
    """The trade-off curve of everything ``accountant`` recorded.

    Without subsampling anywhere the history is exactly one Gaussian mechanism with
    ``mu = sqrt(sum(steps / sigma^2))`` and the curve uses the closed form. Otherwise the profile
    comes from privgrad's PLD accountant on the same history (whatever kind ``accountant`` is: the
    RDP bound's curve would be far looser), and from the accountant's own ``get_delta`` where
    ``dp_accounting`` cannot build the distribution.

    Privacy:
        A pessimistic curve: no test does better than it says (module docstring).
    """
    from privgrad.accounting.events import history_event, is_nonprivate
    from privgrad.accounting.pld import LARGE_EPSILON, PLDAccountant

    history = accountant.history
    if not history:
        return TradeOffCurve(np.zeros(1), np.zeros(1))
    if any(is_nonprivate(s) for s, _, _ in history):
        return TradeOffCurve(np.zeros(1), np.ones(1), nonprivate=True)
    if all(q == 1.0 for _, q, _ in history):
        return _gaussian_curve(math.sqrt(sum(n / s**2 for s, _, n in history)))
    pld = PLDAccountant()
    pld.compose(history_event(history))
    dist = pld._distribution()
    if dist is None:  # dp_accounting cannot build it: the accountant's own (upper) bound
        top = accountant.get_epsilon(_DELTA_FLOOR)
        eps = np.linspace(0.0, top, 400) if math.isfinite(top) else np.zeros(1)
        return TradeOffCurve(eps, np.array([accountant.get_delta(e) for e in eps]))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # The truncated tail is counted as infinite loss: delta never falls below its mass.
        top = next((t for t in (float(dist.get_epsilon_for_delta(f)) for f in _FLOORS)
                    if math.isfinite(t)), 1e3)
        eps = _grid(min(max(top, 1e-3), LARGE_EPSILON))
        deltas = np.asarray(dist.get_delta_for_epsilon(eps), dtype=np.float64)
    # Where exp(epsilon) overflows dp_accounting answers NaN; delta only falls with epsilon, so
    # the last value before it is an upper bound there.
    known = np.where(np.isnan(deltas), 0, np.arange(deltas.size))
    deltas = deltas[np.maximum.accumulate(known)]
    return TradeOffCurve(eps, np.clip(np.nan_to_num(deltas, nan=1.0), 0.0, 1.0))
