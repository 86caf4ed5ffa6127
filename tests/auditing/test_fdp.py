"""The f-DP one-run bound (privgrad.auditing.fdp): exact references, properties, bad input.

The exact reference: randomised response with parameter epsilon is (epsilon, 0)-DP and an auditor
that guesses every canary's bit from its own response is right independently with probability
``e^eps / (1 + e^eps)``, so ``P[at least v right]`` is a binomial tail. Any valid p-value for the
claim "(epsilon, 0)-DP" must be at least that tail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from privgrad.auditing.fdp import (
    FAMILIES,
    fdp_ceiling,
    fdp_lower_bound,
    fdp_mu_lower_bound,
    fdp_p_value,
)
from privgrad.auditing.statistics import one_run_lower_bound
from privgrad.errors import ConfigError, ConfigTypeError


@pytest.mark.parametrize("m,r", [(20, 20), (200, 200), (1000, 100), (1000, 1000)])
@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_p_value_dominates_the_exact_tail_of_randomised_response(m, r, eps):
    p = special.expit(eps)
    for v in range(int(r * p), r + 1, max(1, r // 25)):
        exact = stats.binom.sf(v - 1, r, p)
        assert fdp_p_value(m, r, v, eps, 0.0, family="epsilon-delta") >= exact * (1 - 1e-6), v


@pytest.mark.parametrize("m,r,v", [(1000, 100, 80), (1000, 100, 95), (5000, 250, 200),
                                   (1000, 1000, 700), (1000, 20, 20)])
def test_epsilon_delta_family_agrees_with_the_one_run_bound(m, r, v):
    """Both test the same (epsilon, delta) claim: measured within 0.04 of each other."""
    fdp = fdp_lower_bound(m, r, v, 1e-5, family="epsilon-delta")
    assert fdp == pytest.approx(one_run_lower_bound(m, r, v, 1e-5), abs=0.04)


def test_gaussian_family_is_tighter_on_the_same_counts():
    for m, r, v in [(1000, 100, 80), (1000, 100, 95), (5000, 250, 200), (1000, 100, 100)]:
        assert fdp_lower_bound(m, r, v, 1e-5) > one_run_lower_bound(m, r, v, 1e-5) + 0.3
    # the ceiling of 100 guesses: 3.47 for the one-run bound, 5.55 for the f-DP bound
    assert fdp_ceiling(1000, 100, 1e-5) == pytest.approx(5.549, abs=2e-3)


def test_mu_bound_is_the_epsilon_bound_in_gaussian_units():
    from privgrad.accounting.tradeoff import gdp_epsilon

    mu = fdp_mu_lower_bound(1000, 100, 90)
    assert gdp_epsilon(mu, 1e-5) == pytest.approx(fdp_lower_bound(1000, 100, 90, 1e-5), rel=1e-6)
    assert gdp_epsilon(mu, 1e-3) == pytest.approx(fdp_lower_bound(1000, 100, 90, 1e-3), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bound_grows_with_correct_guesses_and_shrinks_with_confidence(family):
    bounds = [fdp_lower_bound(1000, 100, v, 1e-5, 0.95, family) for v in range(50, 101, 5)]
    assert bounds[0] == 0 and np.all(np.diff(bounds) >= 0) and bounds[-1] > 2
    assert fdp_lower_bound(1000, 100, 90, 1e-5, 0.99, family) < fdp_lower_bound(
        1000, 100, 90, 1e-5, 0.9, family)
    assert fdp_ceiling(1000, 100, 1e-5, family=family) == bounds[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_p_value_at_the_bound_is_the_level(family):
    bound = fdp_lower_bound(1000, 200, 170, 1e-5, 0.95, family)
    assert fdp_p_value(1000, 200, 170, bound * (1 - 1e-4), 1e-5, family) <= 0.05 * 1.001
    assert fdp_p_value(1000, 200, 170, bound * (1 + 1e-3), 1e-5, family) > 0.05
    assert fdp_p_value(1000, 200, 100, 0.0, 1e-5, family) == 1.0


def test_no_guesses_or_no_correct_guess_shows_nothing():
    assert fdp_lower_bound(1000, 0, 0, 1e-5) == 0
    assert fdp_lower_bound(1000, 100, 0, 1e-5) == 0


def test_pure_dp_is_tested_with_the_epsilon_delta_family():
    assert fdp_lower_bound(1000, 100, 100, 0.0, family="epsilon-delta") > 3
    assert math.isfinite(fdp_p_value(1000, 100, 100, 1.0, 0.0, family="epsilon-delta"))


@pytest.mark.parametrize("call,error,match", [
    (lambda: fdp_lower_bound(1000, 100, 90, 0.0),
     ConfigError, r"delta must be > 0 for family='gaussian' .*; got delta=0.0\. Pass the delta"),
    (lambda: fdp_lower_bound(1000, 100, 90, 1e-5, confidence=1.0),
     ConfigError, r"confidence must be in \(0, 1\); got confidence=1.0\. Pass e\.g\. 0\.95"),
    (lambda: fdp_lower_bound(1000, 100, 90, 1e-5, confidence=0),
     ConfigError, r"confidence must be in \(0, 1\); got confidence=0"),
    (lambda: fdp_lower_bound(100, 101, 90, 1e-5),
     ConfigError, r"num_guesses must be <= num_canaries \(100\); got num_guesses=101\. Guess at most"),
    (lambda: fdp_lower_bound(1000, 100, 101, 1e-5),
     ConfigError, r"num_correct must be <= num_guesses \(100\); got num_correct=101"),
    (lambda: fdp_lower_bound(1000, 100, 90, 1e-5, family="gdp"),
     ConfigError, r"family must be one of 'gaussian', 'epsilon-delta'; got family='gdp'"),
    (lambda: fdp_lower_bound(1000, 100.5, 90, 1e-5),
     ConfigTypeError, r"num_guesses must be an integer; got num_guesses=100.5"),
])
def test_bad_input_names_the_value_and_the_fix(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_the_exact_check_catches_an_over_eager_recursion(monkeypatch):
    """Mutant: the recursion starts as if every guess on the event were right (h_v = 0). The
    p-value then drops below randomised response's exact tail, which the first test checks."""
    from privgrad.auditing import fdp

    original = fdp._refuted
    monkeypatch.setattr(fdp, "_refuted", lambda m, r, v, inverse, tau: original(
        m, r, v, inverse, tau * r / max(v, 1)) if v < r else original(m, r, v, inverse, tau))
    fdp._bound.cache_clear()
    m = r = 200
    p = special.expit(1.0)
    broken = [fdp.fdp_p_value(m, r, v, 1.0, 0.0, family="epsilon-delta") < stats.binom.sf(v - 1, r, p)
              for v in range(int(r * p), r, 4)]
    assert any(broken)
