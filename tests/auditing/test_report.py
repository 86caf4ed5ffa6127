"""The simulated band and the report, on runs of the mechanism simulated step by step in NumPy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from privgrad.accounting import epsilon_for, get_noise_multiplier
from privgrad.auditing.report import AuditReport, Observations, evaluate
from privgrad.auditing.simulation import (
    AuditSettings,
    GuessRule,
    choose_guesses,
    lower_bounds,
    simulate_band,
    simulate_scores,
)
from privgrad.errors import ConfigError

M, Q, T, C, DELTA = 600, 0.2, 100, 2.0, 1e-5


@pytest.fixture(scope="module")
def sigma() -> float:
    return get_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=Q, steps=T)


@pytest.fixture(scope="module")
def settings(sigma) -> AuditSettings:
    return AuditSettings(M, Q, sigma, C, T, DELTA)


def step_by_step(rng, settings: AuditSettings, *, noise_scale=1.0, contribution=1.0,
                 runs=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DP-SGD on canary coordinates, one step at a time: Poisson sampling of the included
    canaries, a clipped contribution C, Gaussian noise sigma*C. Independent of simulate_scores."""
    shape = (settings.num_canaries,) if runs is None else (runs, settings.num_canaries)
    included = rng.random(shape) < 0.5
    steps = (settings.steps, *shape)
    sampled = (rng.random(steps) < settings.sample_rate) & included
    c = settings.max_grad_norm
    noise = rng.standard_normal(steps) * settings.noise_multiplier * c * noise_scale
    return included, c * contribution * sampled + noise, sampled


def observe(rng, settings, **kwargs) -> Observations:
    included, released, sampled = step_by_step(rng, settings, **kwargs)
    return Observations(included, released, sampled)


def test_fast_simulation_matches_the_step_by_step_mechanism(settings):
    """simulate_scores draws sums directly; its bounds must be distributed like those of the
    step-by-step mechanism (two-sample KS) and its scores must have the right moments."""
    rng = np.random.default_rng(10)
    rule = GuessRule(((30, 30),))
    included, released, _ = step_by_step(rng, settings, runs=300)
    slow = lower_bounds(released.sum(0) / C, included, rule, settings)
    inc_fast, fast_scores = simulate_scores(settings, 300, rng)
    fast = lower_bounds(fast_scores, inc_fast, rule, settings)
    assert stats.ks_2samp(slow, fast).pvalue > 1e-3
    s = settings
    ins, outs = fast_scores[inc_fast], fast_scores[~inc_fast]
    assert abs(ins.mean() - T * Q) < 4 * math.sqrt(T * (s.noise_multiplier**2 + Q * (1 - Q)) / ins.size)
    assert abs(outs.var() / (T * s.noise_multiplier**2) - 1) < 4 * math.sqrt(2 / outs.size)


def test_guesses_are_chosen_from_public_settings_only(settings):
    a = choose_guesses(settings, np.random.default_rng(0))
    b = choose_guesses(settings, np.random.default_rng(0))
    assert a == b and not a.bonferroni and a.chosen_by == "chosen by simulation"
    kp, kn = a.candidates[0]
    assert 0 < kp + kn <= M


def test_band_orders_and_grows_with_epsilon(settings):
    rng = np.random.default_rng(11)
    rule = GuessRule(((30, 30),))
    band = simulate_band(settings, rule, rng, simulations=400, coverage=0.98)
    assert band.low <= band.median <= band.high and band.simulations == 400
    noisier = AuditSettings(M, Q, settings.noise_multiplier * 3, C, T, DELTA)
    assert simulate_band(noisier, rule, rng, simulations=400).median < band.median


def test_correct_run_is_consistent(settings, sigma):
    obs = observe(np.random.default_rng(12), settings)
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=Q, steps=T, delta=DELTA)
    report = evaluate(obs, settings, eps, simulations=500, seed=1)
    assert report.verdict == "consistent", report.text()
    assert report.lower_bound <= eps and report.band.contains(report.lower_bound)
    assert [t.name for t in report.tests] == ["noise_std", "noise_mean", "contribution",
                                              "inclusion_rate", "inclusion_spread",
                                              "excluded_unsampled"]
    assert report.included == int(obs.included.sum())
    assert report.lower_bound <= report.ceiling
    text = report.text()
    assert "verdict: consistent" in text and f"{report.lower_bound:.2f}" in text
    data = json.loads(report.to_json())
    assert data["verdict"] == "consistent" and data["settings"]["num_canaries"] == M
    assert all(t["passed"] for t in data["tests"])


@pytest.mark.parametrize("kwargs,failing", [
    ({"noise_scale": 0.5}, "noise_std"),
    ({"noise_scale": 1.1}, "noise_std"),
    ({"contribution": 0.0}, "contribution"),
    ({"contribution": 50.0}, "contribution"),
])
def test_broken_mechanisms_are_violations(settings, sigma, kwargs, failing):
    obs = observe(np.random.default_rng(13), settings, **kwargs)
    report = evaluate(obs, settings, 4.0, simulations=300, seed=2)
    assert report.verdict == "violation"
    assert any(e.startswith(failing) for e in report.evidence), report.evidence
    assert not next(t for t in report.tests if t.name == failing).passed(report.alpha)


def test_a_bound_above_the_accountant_is_a_violation(settings):
    """Noise 20 times too small: the canaries are nearly exposed and the bound beats the claim."""
    obs = observe(np.random.default_rng(14), settings, noise_scale=0.05)
    report = evaluate(obs, settings, 1.0, guesses=(150, 150), simulations=200, seed=3)
    assert report.lower_bound > 1.0 and report.p_value < 0.05
    assert report.verdict == "violation"
    assert "exceeds the accountant's epsilon" in report.evidence[0]


def test_given_and_bonferroni_guesses(settings):
    obs = observe(np.random.default_rng(15), settings)
    fixed = evaluate(obs, settings, 4.0, guesses=(40, 20), simulations=200, seed=4)
    assert fixed.guesses == (40, 20) and "given" in fixed.guess_rule
    many = evaluate(obs, settings, 4.0, guesses=[(10, 10), (40, 40)], simulations=100, seed=4)
    assert many.guesses in [(10, 10), (40, 40)] and "Bonferroni" in many.guess_rule


def test_infinite_accountant_epsilon_is_null_in_json(settings):
    obs = observe(np.random.default_rng(16), settings)
    report = evaluate(obs, settings, math.inf, guesses=(30, 30), simulations=100, seed=5)
    data = json.loads(report.to_json())
    assert data["accountant_epsilon"] is None and report.p_value == 1.0
    assert isinstance(report, AuditReport)


def test_observations_without_sampling_info_run_the_noise_tests_only(settings):
    included, released, _ = step_by_step(np.random.default_rng(17), settings)
    report = evaluate(Observations(included, released), settings, 4.0, guesses=(30, 30),
                      simulations=100, seed=6)
    assert [t.name for t in report.tests] == ["noise_std", "noise_mean"]


@pytest.mark.parametrize("call,match", [
    (lambda s: Observations(np.zeros(5, bool), np.zeros((3, 4))), r"released must be \(steps, m\)"),
    (lambda s: Observations(np.zeros(4, bool), np.zeros((3, 4)), np.zeros((2, 4), bool)),
     "sampled must have the shape of released"),
    (lambda s: evaluate(Observations(np.zeros(M, bool), np.zeros((T + 1, M))), s, 1.0),
     "the observations must match the settings"),
    (lambda s: evaluate(Observations(np.zeros(M, bool), np.zeros((T, M))), s, 1.0, guesses=(0, 0)),
     "each guess pair must make between 1 and"),
    (lambda s: evaluate(Observations(np.zeros(M, bool), np.zeros((T, M))), s, -1.0),
     "accountant_epsilon must be > 0"),
    (lambda s: AuditSettings(10, 0.1, 0.0, 1.0, 5, 1e-5), "noise_multiplier must be > 0"),
    (lambda s: AuditSettings(10, 1.5, 1.0, 1.0, 5, 1e-5), r"sample_rate must be in \(0, 1\]"),
])
def test_bad_input(settings, call, match):
    with pytest.raises(ConfigError, match=match):
        call(settings)
