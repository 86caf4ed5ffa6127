"""The statistics of a one-run privacy audit, in NumPy and SciPy (no torch).

Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy auditing with one (1) training run"): ``m``
canaries are each included in the training set independently with probability 1/2. After one
training run the auditor scores every canary, guesses "in" for the ``k+`` highest scores and "out"
for the ``k-`` lowest (abstaining on the rest), and counts the ``v`` correct guesses among the
``r = k+ + k-`` made. Under ``(epsilon, delta)``-DP the count is stochastically dominated, up to a
``delta`` term, by ``Binomial(r, e^epsilon / (1 + e^epsilon))`` (their main theorem):

    P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v].

The audited lower bound is the largest epsilon this p-value rejects at the chosen confidence.

The second half holds the conformance tests run on the canary coordinates (noise scale and
centre, per-inclusion contribution, inclusion rate and spread): each returns a
``TestResult`` with a p-value under the hypothesis that the mechanism is what it claims.

Formal guarantees:
    ``one_run_p_value()`` is a valid p-value for the null hypothesis "the released training
    run is (epsilon, delta)-DP with respect to each canary" whenever the guesses are a function of
    the released run and of randomness independent of the canaries' inclusion. Guesses chosen
    after looking at the inclusion bits, or the best of several guess counts without
    ``bonferroni_lower_bound()``, void it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, special, stats

from privgrad import _validate

__all__ = [
    "TestResult",
    "binomial_test",
    "bonferroni_lower_bound",
    "ceiling",
    "count_correct",
    "difference_test",
    "dispersion_test",
    "make_guesses",
    "mean_test",
    "one_run_lower_bound",
    "one_run_p_value",
    "variance_test",
]

_EPSILON_MAX = 50.0  # p-values are flat beyond this: exp(-50) is below any confidence level


def _counts(num_canaries: object, num_guesses: object, num_correct: object) -> tuple[int, int, int]:
    m = _validate.positive_int("num_canaries", num_canaries, "Pass the number of canaries, e.g. 1000.")
    r = _validate.nonnegative_int("num_guesses", num_guesses, "Pass the number of guesses made.")
    v = _validate.nonnegative_int("num_correct", num_correct, "Pass the number of correct guesses.")
    if r > m:
        raise _validate.fail(f"num_guesses must be <= num_canaries ({m})", "num_guesses", r,
                             "Guess at most once per canary.")
    if v > r:
        raise _validate.fail(f"num_correct must be <= num_guesses ({r})", "num_correct", v,
                             "Count correct guesses among those made.")
    return m, r, v


def _check_delta(delta: object) -> float:
    d = _validate.finite_nonnegative("delta", delta, "Pass the delta of the claim, e.g. 1e-5.")
    if d >= 1:
        raise _validate.fail("delta must be < 1", "delta", delta, "Pass e.g. 1e-5.")
    return d


def _check_confidence(confidence: object) -> float:
    return _validate.open_unit("confidence", confidence, "Pass e.g. 0.95.")


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
                    delta: float) -> float:
    """P-value of ``num_correct`` or more correct guesses if the run is ``(epsilon, delta)``-DP.

    Args:
        num_canaries: ``m``, canaries each included with probability 1/2.
        num_guesses: ``r``, guesses made (abstentions excluded).
        num_correct: ``v``, correct guesses among them.
        epsilon: the epsilon of the claim under test, >= 0.
        delta: the delta of the claim, in [0, 1).

    Returns:
        ``min(1, f(v) + 2 m delta max_i (f(v - i) - f(v)) / i)`` (see the module docstring).

    Privacy:
        Valid for guesses fixed before the inclusion bits are revealed (module docstring).
    """
    m, r, v = _counts(num_canaries, num_guesses, num_correct)
    eps = _validate.finite_nonnegative("epsilon", epsilon, "Pass the epsilon of the claim.")
    return _p_value(m, r, v, eps, _check_delta(delta))


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    p = float(special.expit(eps))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    below = stats.binom.sf(v - i - 1, r, p) - tail  # P[v - i <= Binomial < v]
    return min(1.0, tail + float(np.max(below / i)) * 2 * m * delta)


@lru_cache(maxsize=65536)
def _lower_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    if _p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    if _p_value(m, r, v, _EPSILON_MAX, delta) <= beta:
        return _EPSILON_MAX
    return float(optimize.brentq(lambda e: _p_value(m, r, v, e, delta) - beta, 0.0, _EPSILON_MAX,
                                 xtol=1e-6))


def one_run_lower_bound(num_canaries: int, num_guesses: int, num_correct: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The largest epsilon whose ``(epsilon, delta)`` claim the guesses reject at ``confidence``.

    Returns 0.0 when not even ``epsilon = 0`` is rejected.

    Privacy:
        With probability at least ``confidence`` over the run's randomness, a mechanism that is
        ``(epsilon, delta)``-DP yields a bound below ``epsilon``. So a bound above the
        accountant's epsilon is evidence of a privacy bug, and a bound below it is *not* a
        guarantee: the method is capped by ``ceiling()``.
    """
    m, r, v = _counts(num_canaries, num_guesses, num_correct)
    return _lower_bound(m, r, v, _check_delta(delta), 1.0 - _check_confidence(confidence))


def ceiling(num_canaries: int, num_guesses: int, delta: float, confidence: float = 0.95) -> float:
    """The bound when every one of ``num_guesses`` guesses is right: the most this audit can show.

    For ``delta = 0`` it is ``logit(beta ** (1 / r))``, about ``ln(r / ln(1 / beta))`` with
    ``beta = 1 - confidence``: 5.8 for 1,000 guesses at 95%.
    """
    return one_run_lower_bound(num_canaries, num_guesses, num_guesses, delta, confidence)


def make_guesses(scores: np.ndarray, num_positive: int, num_negative: int) -> np.ndarray:
    """Guesses ``+1`` ("in") for the ``num_positive`` highest scores, ``-1`` for the
    ``num_negative`` lowest, ``0`` (abstain) elsewhere. Ties break by canary index."""
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.shape[-1]
    kp = _validate.nonnegative_int("num_positive", num_positive, "Pass how many 'in' guesses.")
    kn = _validate.nonnegative_int("num_negative", num_negative, "Pass how many 'out' guesses.")
    if kp + kn > m:
        raise _validate.fail(f"num_positive + num_negative must be <= the number of canaries ({m})",
                             "num_positive + num_negative", kp + kn, "Guess fewer canaries.")
    order = np.argsort(scores, axis=-1, kind="stable")
    guesses = np.zeros(scores.shape, dtype=np.int8)
    if kp:
        np.put_along_axis(guesses, order[..., m - kp:], 1, axis=-1)
    if kn:
        np.put_along_axis(guesses, order[..., :kn], -1, axis=-1)
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> np.ndarray | int:
    """Correct guesses (``+1`` on an included canary, ``-1`` on an excluded one), over the last axis."""
    guesses, included = np.asarray(guesses), np.asarray(included, dtype=bool)
    right = ((guesses == 1) & included) | ((guesses == -1) & ~included)
    out = right.sum(axis=-1)
    return int(out) if np.ndim(out) == 0 else out


def bonferroni_lower_bound(scores: np.ndarray, included: np.ndarray,
                           candidates: Sequence[tuple[int, int]], delta: float,
                           confidence: float = 0.95) -> tuple[float, tuple[int, int], int]:
    """The best bound over several ``(num_positive, num_negative)`` guess counts, each tested at
    ``1 - (1 - confidence) / len(candidates)`` so that the best is valid at ``confidence``.

    Returns:
        ``(bound, (num_positive, num_negative), num_correct)`` of the best candidate.
    """
    if not candidates:
        raise _validate.fail("candidates must not be empty", "candidates", candidates,
                             "Pass at least one (num_positive, num_negative) pair.")
    conf = 1.0 - (1.0 - _check_confidence(confidence)) / len(candidates)
    m = np.asarray(scores).shape[-1]
    best = (-1.0, (0, 0), 0)
    for kp, kn in candidates:
        v = count_correct(make_guesses(scores, kp, kn), included)
        bound = one_run_lower_bound(m, kp + kn, v, delta, conf)
        if bound > best[0]:
            best = (bound, (int(kp), int(kn)), v)
    return best


# -- conformance tests -------------------------------------------------------------------------
@dataclass(frozen=True)
class TestResult:
    """One conformance test on the canary coordinates.

    Attributes:
        name: short identifier, e.g. ``"noise_std"``.
        claim: what a correct implementation satisfies, in words.
        expected: the claimed value of the tested quantity.
        observed: its estimate from this run.
        p_value: two-sided p-value of ``observed`` under the claim.
        samples: how many values the estimate rests on.
    """

    __test__ = False  # not a pytest test class

    name: str
    claim: str
    expected: float
    observed: float
    p_value: float
    samples: int

    def passed(self, alpha: float) -> bool:
        return self.p_value > alpha


def _two_sided_normal(z: float) -> float:
    return float(2 * stats.norm.sf(abs(z))) if math.isfinite(z) else 0.0


def variance_test(name: str, claim: str, values: np.ndarray, std: float) -> TestResult:
    """Chi-square test that ``values`` (mean 0 by claim) have standard deviation ``std``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    ss = float(np.square(x).sum())
    observed = math.sqrt(ss / n) if n else float("nan")
    if n == 0:
        p = 1.0
    elif std == 0:
        p = 1.0 if ss == 0 else 0.0
    else:
        chi2 = ss / std**2
        p = float(min(1.0, 2 * min(stats.chi2.cdf(chi2, n), stats.chi2.sf(chi2, n))))
    return TestResult(name, claim, float(std), observed, p, n)


def mean_test(name: str, claim: str, values: np.ndarray, mean: float, std: float) -> TestResult:
    """z-test that ``values`` with known standard deviation ``std`` have mean ``mean``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    observed = float(x.mean()) if n else float("nan")
    if n == 0:
        p = 1.0
    elif std == 0:
        p = 1.0 if np.all(x == mean) else 0.0
    else:
        p = _two_sided_normal((observed - mean) / (std / math.sqrt(n)))
    return TestResult(name, claim, float(mean), observed, p, n)


def difference_test(name: str, claim: str, with_: np.ndarray, without: np.ndarray,
                    difference: float, std: float) -> TestResult:
    """z-test that ``mean(with_) - mean(without) == difference``, both with known std ``std``."""
    a = np.asarray(with_, dtype=np.float64).ravel()
    b = np.asarray(without, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        return TestResult(name, claim, float(difference), float("nan"), 1.0, a.size + b.size)
    observed = float(a.mean() - b.mean())
    se = std * math.sqrt(1 / a.size + 1 / b.size)
    if se == 0:
        p = 1.0 if math.isclose(observed, difference, rel_tol=1e-4, abs_tol=1e-6) else 0.0
    else:
        p = _two_sided_normal((observed - difference) / se)
    return TestResult(name, claim, float(difference), observed, p, a.size + b.size)


def binomial_test(name: str, claim: str, successes: int, trials: int, rate: float) -> TestResult:
    """Exact two-sided binomial test that ``successes`` out of ``trials`` have rate ``rate``."""
    if trials == 0:
        return TestResult(name, claim, float(rate), float("nan"), 1.0, 0)
    p = float(stats.binomtest(int(successes), int(trials), rate).pvalue) if 0 < rate < 1 else (
        1.0 if successes == rate * trials else 0.0)
    return TestResult(name, claim, float(rate), successes / trials, p, int(trials))


def dispersion_test(name: str, claim: str, counts: np.ndarray, trials: int, rate: float) -> TestResult:
    """Test that ``counts`` are independent ``Binomial(trials, rate)`` draws, by their spread.

    The statistic is the mean of ``(K - T q)^2 / (T q (1 - q))`` (1 under the claim; 0 when every
    count is the same, as with shuffled fixed-size batches). It is compared with its exact mean 1
    and variance ``(2 + (1 - 6 q (1 - q)) / (T q (1 - q))) / n`` by a normal approximation over
    the ``n`` counts. ``observed`` and ``expected`` are this ratio of variances.
    """
    k = np.asarray(counts, dtype=np.float64).ravel()
    n = k.size
    var = trials * rate * (1 - rate)
    if n == 0 or var == 0:
        return TestResult(name, claim, 1.0, float("nan"), 1.0, n)
    ratio = float(np.mean(np.square(k - trials * rate)) / var)
    spread = math.sqrt((2 + (1 - 6 * rate * (1 - rate)) / var) / n)
    return TestResult(name, claim, 1.0, ratio, _two_sided_normal((ratio - 1) / spread), n)
