"""Noise calibration and budget tools: never overshoot, and close to the smallest answer."""

from __future__ import annotations

import math

import pytest

from privgrad.accounting import epsilon_for, get_max_epochs, get_max_steps, get_noise_multiplier
from privgrad.errors import ConfigError, PrivacyBudgetError


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("target, q, steps", [(3.0, 0.01, 1000), (1.0, 0.004, 2500), (8.0, 0.1, 50)])
def test_calibrated_noise_meets_target_and_is_tight(accountant, target, q, steps):
    sigma = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps, accountant=accountant)
    kw = dict(sample_rate=q, steps=steps, delta=1e-5, accountant=accountant)
    assert epsilon_for(noise_multiplier=sigma, **kw) <= target
    # 0.5% less noise must overshoot: the answer is within 0.5% of the smallest that works.
    assert epsilon_for(noise_multiplier=sigma / 1.005, **kw) > target


def test_unreachable_target_is_a_budget_error():
    with pytest.raises(PrivacyBudgetError, match="target_epsilon must be reachable with noise_multiplier <= 10000; got target_epsilon=1e-06"):
        get_noise_multiplier(target_epsilon=1e-6, target_delta=1e-10, sample_rate=1.0, steps=10**5, accountant="rdp")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_epsilon": 0.0}, r"target_epsilon must be > 0 and finite; got target_epsilon=0.0"),
        ({"target_epsilon": -1.0}, "target_epsilon must be > 0"),
        ({"target_delta": 1.0}, r"target_delta must be in \(0, 1\); got target_delta=1.0"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]; got sample_rate=0.0"),
        ({"steps": 0}, "steps must be >= 1; got steps=0"),
        ({"accountant": "gdp"}, "accountant must be one of 'pld', 'rdp'; got accountant='gdp'"),
    ],
)
def test_get_noise_multiplier_rejects_bad_input(kwargs, match):
    args = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp") | kwargs
    with pytest.raises(ConfigError, match=match):
        get_noise_multiplier(**args)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_max_steps_is_the_last_step_within_budget(accountant):
    kw = dict(noise_multiplier=1.0, sample_rate=0.01, delta=1e-5, accountant=accountant)
    steps = get_max_steps(target_epsilon=2.0, target_delta=1e-5, noise_multiplier=1.0, sample_rate=0.01, accountant=accountant)
    assert steps > 0
    assert epsilon_for(steps=steps, **kw) <= 2.0 < epsilon_for(steps=steps + 1, **kw)
    epochs = get_max_epochs(target_epsilon=2.0, target_delta=1e-5, noise_multiplier=1.0, sample_rate=0.01, accountant=accountant)
    assert epochs == pytest.approx(steps * 0.01)


def test_max_steps_zero_when_one_step_is_too_much():
    assert get_max_steps(target_epsilon=0.01, target_delta=1e-5, noise_multiplier=0.5, sample_rate=1.0, accountant="rdp") == 0


def test_max_steps_zero_noise_allows_nothing():
    assert get_max_steps(target_epsilon=10.0, target_delta=1e-5, noise_multiplier=0.0, sample_rate=0.5, accountant="rdp") == 0
    assert math.isinf(epsilon_for(noise_multiplier=0.0, sample_rate=0.5, steps=1, delta=1e-5, accountant="pld"))
