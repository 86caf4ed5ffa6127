"""The one-run p-value and lower bound, guesses, and the conformance tests (NumPy only)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from privgrad.auditing.statistics import (
    binomial_test,
    bonferroni_lower_bound,
    ceiling,
    count_correct,
    difference_test,
    dispersion_test,
    make_guesses,
    mean_test,
    one_run_lower_bound,
    one_run_p_value,
    variance_test,
)
from privgrad.errors import ConfigError, ConfigTypeError


def reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al.'s bound written out with exact binomial coefficients (no SciPy)."""
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]

    def tail(u: int) -> float:  # P[Binomial(r, p) >= u]
        return math.fsum(pmf[max(u, 0):])

    alpha = max([(tail(v - i) - tail(v)) / i for i in range(1, v + 1)], default=0.0)
    return min(1.0, tail(v) + 2 * m * delta * alpha)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (1000, 100, 80, 1.0, 1e-5), (1000, 100, 80, 1.0, 0.0), (5000, 200, 150, 0.5, 1e-5),
    (100, 20, 20, 3.0, 1e-3), (100, 20, 0, 0.0, 1e-3), (1000, 60, 45, 2.2, 1e-4),
])
def test_p_value_matches_reference(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


def test_p_value_grows_with_epsilon_and_delta():
    ps = [one_run_p_value(1000, 100, 80, e, 1e-5) for e in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(ps, ps[1:]))
    assert one_run_p_value(1000, 100, 80, 1.0, 1e-4) > one_run_p_value(1000, 100, 80, 1.0, 1e-6)


def test_lower_bound_is_where_the_p_value_crosses_beta():
    bound = one_run_lower_bound(1000, 100, 85, 1e-5, 0.95)
    assert bound > 0
    assert one_run_p_value(1000, 100, 85, bound - 1e-4, 1e-5) <= 0.05
    assert one_run_p_value(1000, 100, 85, bound + 1e-4, 1e-5) > 0.05


def test_lower_bound_monotone_and_zero_at_chance():
    bounds = [one_run_lower_bound(1000, 100, v, 1e-5) for v in range(50, 101)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert one_run_lower_bound(1000, 100, 50, 1e-5) == 0.0
    # higher confidence, lower bound
    assert one_run_lower_bound(1000, 100, 85, 1e-5, 0.99) < one_run_lower_bound(1000, 100, 85, 1e-5)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_ceiling_closed_form(r):
    beta = 0.05
    p = beta ** (1 / r)
    assert ceiling(r, r, 0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    # the rule of thumb of the docs: about ln(r / ln(1 / beta)), closer for more guesses
    assert ceiling(r, r, 0.0) == pytest.approx(math.log(r / math.log(1 / beta)), abs=0.6 / math.sqrt(r))
    assert ceiling(1000, r, 1e-5) <= ceiling(1000, r, 0.0)


def test_bound_is_valid_and_tight_for_randomized_response():
    """An exactly eps-DP mechanism (randomized response on each canary's bit): the 95% bound
    exceeds eps at most 5% of the time, and is not needlessly loose (median close to eps)."""
    rng = np.random.default_rng(1)
    eps, m, runs = 1.0, 1000, 400
    included = rng.random((runs, m)) < 0.5
    truthful = rng.random((runs, m)) < math.exp(eps) / (1 + math.exp(eps))
    scores = np.where(truthful, included, ~included) + 1e-3 * rng.random((runs, m))
    guesses = make_guesses(scores, m // 2, m // 2)
    bounds = np.array([one_run_lower_bound(m, m, v, 0.0) for v in count_correct(guesses, included)])
    exceed = int((bounds > eps).sum())
    assert exceed <= stats.binom.ppf(1 - 1e-3, runs, 0.05)
    assert 0.8 <= float(np.median(bounds)) <= eps


def test_guesses_and_counting():
    scores = np.array([0.1, 5.0, -3.0, 2.0, 0.0])
    g = make_guesses(scores, 2, 1)
    assert g.tolist() == [0, 1, -1, 1, 0]
    included = np.array([True, True, False, False, True])
    assert count_correct(g, included) == 2
    batch = make_guesses(np.stack([scores, -scores]), 1, 1)
    assert batch.tolist() == [[0, 1, -1, 0, 0], [0, -1, 1, 0, 0]]
    assert count_correct(batch, np.stack([included, included])).tolist() == [2, 0]


def test_bonferroni_is_never_above_the_uncorrected_bound():
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    scores = included * 3.0 + rng.standard_normal(1000) * 2.0
    candidates = [(10, 10), (50, 50), (100, 100)]
    bound, pair, correct = bonferroni_lower_bound(scores, included, candidates, 1e-5)
    assert pair in candidates
    assert correct == count_correct(make_guesses(scores, *pair), included)
    assert bound == pytest.approx(one_run_lower_bound(1000, sum(pair), correct, 1e-5, 1 - 0.05 / 3))
    assert bound < one_run_lower_bound(1000, sum(pair), correct, 1e-5)


@pytest.mark.parametrize("call,error,match", [
    (lambda: one_run_p_value(10, 11, 0, 1.0, 0.0), ConfigError, "num_guesses must be <= num_canaries"),
    (lambda: one_run_p_value(10, 5, 6, 1.0, 0.0), ConfigError, "num_correct must be <= num_guesses"),
    (lambda: one_run_p_value(10, 5, 3, -1.0, 0.0), ConfigError, "epsilon must be finite and >= 0"),
    (lambda: one_run_p_value(10, 5, 3, 1.0, 1.0), ConfigError, "delta must be < 1"),
    (lambda: one_run_lower_bound(10, 5, 3, 0.0, 1.5), ConfigError, r"confidence must be in \(0, 1\)"),
    (lambda: one_run_lower_bound(10.5, 5, 3, 0.0), ConfigTypeError, "num_canaries must be an integer"),
    (lambda: make_guesses(np.zeros(4), 3, 2), ConfigError, "num_positive \\+ num_negative must be <="),
    (lambda: bonferroni_lower_bound(np.zeros(4), np.zeros(4, bool), [], 0.0), ConfigError,
     "candidates must not be empty"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -- conformance tests: calibrated under the claim, powerful against 5% / 20% errors ----------
def test_variance_test_size_and_power():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(200_000) * 4.0
    assert variance_test("v", "", x, 4.0).p_value > 1e-3
    assert variance_test("v", "", x * 0.95, 4.0).p_value < 1e-3
    assert variance_test("v", "", x * 1.05, 4.0).p_value < 1e-3
    assert variance_test("v", "", np.zeros(3), 0.0).p_value == 1.0


def test_mean_and_difference_tests():
    rng = np.random.default_rng(4)
    noise = rng.standard_normal(100_000) * 5.0
    assert mean_test("m", "", noise, 0.0, 5.0).p_value > 1e-3
    assert mean_test("m", "", noise + 0.2, 0.0, 5.0).p_value < 1e-3
    with_ = 1.0 + rng.standard_normal(50_000) * 5.0
    assert difference_test("d", "", with_, noise, 1.0, 5.0).p_value > 1e-3
    assert difference_test("d", "", with_ + 0.25, noise, 1.0, 5.0).p_value < 1e-3


def test_inclusion_tests_size_and_power():
    rng = np.random.default_rng(5)
    counts = rng.binomial(400, 0.25, size=500)
    assert dispersion_test("s", "", counts, 400, 0.25).p_value > 1e-3
    assert dispersion_test("s", "", np.full(500, 100), 400, 0.25).p_value < 1e-10  # shuffling
    overdispersed = rng.binomial(400, rng.choice([0.15, 0.35], size=500))
    assert dispersion_test("s", "", overdispersed, 400, 0.25).p_value < 1e-3
    assert binomial_test("r", "", int(counts.sum()), 500 * 400, 0.25).p_value > 1e-3
    # a 20% error in q is detected
    assert binomial_test("r", "", int(rng.binomial(500 * 400, 0.3)), 500 * 400, 0.25).p_value < 1e-3
    assert binomial_test("r", "", 0, 1000, 0.0).p_value == 1.0
    assert binomial_test("r", "", 1, 1000, 0.0).p_value == 0.0


def test_statistics_simulation_and_report_import_no_torch():
    code = (
        "import sys\n"
        "import privgrad.auditing, privgrad.auditing.statistics, privgrad.auditing.simulation\n"
        "import privgrad.auditing.report, privgrad.cli.audit\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
