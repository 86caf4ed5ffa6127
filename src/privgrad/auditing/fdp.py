"""The f-DP analysis of a one-run audit (Mahloujifar, Melis and Chaudhuri 2024), in NumPy/SciPy.

Same game as ``statistics`` (Steinke, Nasr and Jagielski 2023): ``m`` canaries, each in the
training set with probability 1/2; the auditor guesses on ``r`` of them and ``v`` guesses are
right. Instead of bounding the count by a binomial, the f-DP analysis asks whether the count is
possible at all for a mechanism whose trade-off curve is ``f``, and so uses the whole curve, not
one ``(epsilon, delta)`` point of it.

Why the recursion below holds. Write ``fbar(x) = 1 - f(x)`` (concave, increasing: the most TPR
at FPR ``x``) and, for ``p_j = P[exactly j correct]``,

    r_i = sum_{j >= i} (j / m) p_j,        h_i = sum_{j >= i} ((r - j) / m) p_j,

the expected correct and wrong guesses per canary, counted on the event "at least ``i``
correct". For canary ``k`` the event "at least ``i`` correct among the *other* guesses" depends
on the output and the other canaries only, so f-DP towards canary ``k`` (in both directions: the
curve must be symmetric) bounds its chance of a right guess on that event by ``fbar`` of its
chance of a wrong one. Summing over the ``m`` canaries and using the concavity of ``fbar``:

    r_{i+1} <= fbar(h_i),  that is  h_i >= fbar^-1(r_{i+1}),  and  r_i - r_{i+1} = i/(r-i) (h_i - h_{i+1}).

If ``P[at least v correct] >= tau``, then ``r_v + h_v = (r / m) P[at least v correct] >= tau r / m``
with a share of at least ``v / r`` of it right; the paper shows that the two relations, run down
to ``i = 0``, bound ``r_0 + h_0`` least when exactly mass ``tau`` sits at ``v`` right, so they
start from ``r_v = tau v / m`` and ``h_v = tau (r - v) / m``. But ``r_0 + h_0`` is exactly
``r / m`` (every guess is right or wrong): a lower bound above it is a contradiction, so
``P[at least v correct] < tau`` and the f-DP claim is rejected at level ``tau`` (their
Algorithm 3, "audit with abstention"). ``tests/auditing/test_fdp.py`` checks the resulting
p-value against exact binomial tails of randomised response, the worst case of (epsilon, 0)-DP.

The curve is taken from a one-parameter family, and the bound is the largest parameter the
observation rejects at ``1 - confidence``, stated as an epsilon at ``delta``:

- ``"gaussian"``: ``mu``-Gaussian-DP, ``fbar^-1(y) = Phi(Phi^-1(y) - mu)``; the bound is the
  epsilon at ``delta`` of the rejected ``mu`` (Balle and Wang). This is the family of
  Mahloujifar et al. and of ``jax_privacy`` for DP-SGD.
- ``"epsilon-delta"``: the curve of ``(epsilon, delta)``-DP itself,
  ``fbar^-1(y) = max(0, (y - delta) e^-eps, 1 - delta - e^eps (1 - y))``.

Formal guarantees:
    With probability at least ``confidence``, a mechanism that is f-DP towards each canary for
    the family's curve at parameter ``theta`` yields a bound below ``theta``, whenever the
    guesses are a function of the released run and of randomness independent of the inclusion
    bits. The ``"epsilon-delta"`` family's bound is therefore a valid lower bound on the epsilon
    of *any* ``(epsilon, delta)``-DP mechanism. The ``"gaussian"`` family's bound is a valid
    lower bound on epsilon only for mechanisms whose curve is at least the Gaussian one with the
    same ``(epsilon, delta)``: the Gaussian mechanism, and (by the central limit theorem,
    approximately) DP-SGD over many steps. It is *not* one for randomised response or other
    pure-epsilon mechanisms, whose curves cross the Gaussian one (tests/auditing/test_validity.py
    measures both).
"""

from __future__ import annotations

import math
from functools import lru_cache

from scipy import special

from privgrad import _validate
from privgrad.auditing.statistics import _check_confidence, _counts

__all__ = ["FAMILIES", "fdp_ceiling", "fdp_lower_bound", "fdp_mu_lower_bound", "fdp_p_value"]

#: The families of trade-off curves the bound can be stated in; this literal is the whole list.
FAMILIES = ("gaussian", "epsilon-delta")
_PARAM_MAX = {"gaussian": 40.0, "epsilon-delta": 50.0}  # beyond: every observation is possible
_TOL = 1e-6


def check_family(family: object) -> str:
    return _validate.choice("family", family, FAMILIES)


def check_delta_for(family: str, delta: object) -> float:
    """``delta`` in [0, 1); the Gaussian family needs ``delta > 0`` to state an epsilon."""
    d = _validate.finite_nonnegative("delta", delta, "Pass the delta of the claim, e.g. 1e-5.")
    if d >= 1:
        raise _validate.fail("delta must be < 1", "delta", delta, "Pass e.g. 1e-5.")
    if d == 0 and family == "gaussian":
        raise _validate.fail(
            "delta must be > 0 for family='gaussian' (every Gaussian-DP curve has epsilon = inf "
            "at delta = 0)", "delta", delta,
            "Pass the delta of the claim, e.g. 1e-5, or family='epsilon-delta' to test pure DP.")
    return d


def _inverse(family: str, theta: float, delta: float):
    """``fbar^-1`` of the family's curve at parameter ``theta`` (mu, or epsilon)."""
    if family == "gaussian":
        mu = theta
        return lambda y: float(special.ndtr(special.ndtri(y) - mu)) if 0 < y < 1 else min(1.0, y)
    grow, shrink = math.exp(theta), math.exp(-theta)
    return lambda y: max(0.0, (y - delta) * shrink, 1.0 - delta - grow * (1.0 - y))


def _refuted(m: int, r: int, v: int, inverse, tau: float) -> bool:
    """Whether ``P[at least v of r guesses right] >= tau`` contradicts the curve (module
    docstring): run ``h_i >= fbar^-1(r_{i+1})`` and the bookkeeping of ``r_i`` down to 0."""
    right, wrong = tau * v / m, tau * (r - v) / m
    for i in range(v - 1, -1, -1):
        need = inverse(right)
        if need <= wrong:  # nothing moves any more: every later step repeats this one
            break
        right = min(1.0, right + i / (r - i) * (need - wrong))
        wrong = need
    return right + wrong > r / m * (1 + 1e-12)


def _largest_rejected(m: int, r: int, v: int, family: str, delta: float, beta: float) -> float:
    """The largest parameter whose curve the observation rejects at level ``beta`` (0 if none)."""
    def rejects(theta: float) -> bool:
        return _refuted(m, r, v, _inverse(family, theta, delta), beta)

    if v == 0 or not rejects(0.0):
        return 0.0
    top = _PARAM_MAX[family]
    if rejects(top):
        return top
    lo, hi = 0.0, top
    while hi - lo > _TOL * max(1.0, lo):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


@lru_cache(maxsize=65536)
def _bound(m: int, r: int, v: int, family: str, delta: float, beta: float) -> tuple[float, float]:
    """``(epsilon, theta)``: the bound as an epsilon at ``delta`` and in the family's parameter."""
    theta = _largest_rejected(m, r, v, family, delta, beta)
    if family == "epsilon-delta":
        return theta, theta
    from privgrad.accounting.tradeoff import gdp_epsilon

    return (gdp_epsilon(theta, delta) if theta > 0 else 0.0), theta


def fdp_lower_bound(num_canaries: int, num_guesses: int, num_correct: int, delta: float,
                    confidence: float = 0.95, family: str = "gaussian") -> float:
    """The largest epsilon (at ``delta``) whose curve in ``family`` the guesses reject.

    Args:
        num_canaries: ``m``, canaries each included with probability 1/2.
        num_guesses: ``r``, guesses made (abstentions excluded), at most ``m``.
        num_correct: ``v``, correct guesses among them.
        delta: the delta the epsilon is stated at; > 0 for ``family="gaussian"``.
        confidence: in (0, 1), e.g. 0.95.
        family: ``"gaussian"`` (default) or ``"epsilon-delta"``; see the module docstring.

    Returns:
        The lower bound, 0.0 when not even a perfectly private curve is rejected.

    Raises:
        ConfigError: counts out of range, a confidence outside (0, 1), an unknown family, or
            ``delta = 0`` with the Gaussian family.

    Privacy:
        See "Formal guarantees" in the module docstring: a bound above the accountant's epsilon
        is evidence of a privacy bug; a bound below it is not a guarantee.
    """
    fam = check_family(family)
    m, r, v = _counts(num_canaries, num_guesses, num_correct)
    beta = 1.0 - _check_confidence(confidence)
    return _bound(m, r, v, fam, check_delta_for(fam, delta), beta)[0]


def fdp_mu_lower_bound(num_canaries: int, num_guesses: int, num_correct: int,
                       confidence: float = 0.95) -> float:
    """The largest Gaussian-DP ``mu`` the guesses reject (no delta needed)."""
    m, r, v = _counts(num_canaries, num_guesses, num_correct)
    return _bound(m, r, v, "gaussian", 1e-5, 1.0 - _check_confidence(confidence))[1]


def fdp_ceiling(num_canaries: int, num_guesses: int, delta: float, confidence: float = 0.95,
                family: str = "gaussian") -> float:
    """The bound when all ``num_guesses`` guesses are right: the most this audit can show."""
    return fdp_lower_bound(num_canaries, num_guesses, num_guesses, delta, confidence, family)


def fdp_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
                delta: float, family: str = "gaussian") -> float:
    """The smallest level at which the guesses reject the family's curve with this
    ``(epsilon, delta)`` (1.0 when no level does): the p-value of the claim."""
    fam = check_family(family)
    m, r, v = _counts(num_canaries, num_guesses, num_correct)
    d = check_delta_for(fam, delta)
    eps = _validate.finite_nonnegative("epsilon", epsilon, "Pass the epsilon of the claim.")
    if fam == "gaussian":
        from privgrad.accounting.tradeoff import gdp_mu

        theta = gdp_mu(eps, d)
    else:
        theta = eps
    inverse = _inverse(fam, theta, d)
    if v == 0 or not _refuted(m, r, v, inverse, 1.0):
        return 1.0
    lo, hi = 0.0, 1.0  # rejected at hi, not at lo (rejection grows with the level)
    for _ in range(200):
        if hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _refuted(m, r, v, inverse, mid) else (mid, hi)
    return hi
