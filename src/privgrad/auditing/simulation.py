"""What a correct implementation produces: the canary audit simulated in NumPy (no torch).

A correct DP-SGD run gives canary ``i`` (included with probability 1/2) the score

    s_i = (1/C) sum_t released_t[i] = K_i + sigma sqrt(T) Z_i,
    K_i ~ Binomial(T, q) if canary i is included, else 0;  Z_i ~ N(0, 1),

because at each of the ``T`` steps an included canary is sampled with probability ``q`` and then
contributes exactly ``C`` (its gradient is clipped from far above ``C``), and every step adds
independent noise ``N(0, (sigma C)^2)`` to its coordinate. The sum of the ``T`` per-step values
is exactly ``C K_i + sigma C sqrt(T) Z_i``, so drawing ``K_i`` and ``Z_i`` directly gives the
score's exact distribution at the cost of ``m`` draws per simulated run (a test checks it against
a step-by-step simulation).

The simulations serve twice: to fix the number of guesses *before* looking at the real run
(``choose_guesses()``, from public settings only), and to give the band of lower bounds that a
correct implementation produces ([`simulate_band()`][privgrad.auditing.simulation.simulate_band]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privgrad import _validate
from privgrad.auditing.fdp import fdp_lower_bound
from privgrad.auditing.statistics import (
    count_correct,
    make_guesses,
    one_run_lower_bound,
)

__all__ = ["METHODS", "AuditSettings", "Band", "GuessRule", "choose_guesses",
           "default_candidates", "lower_bounds", "simulate_band", "simulate_scores"]

#: How a lower bound is computed from ``(m, r, v, delta, confidence)``; the whole list.
METHODS = {
    "one-run": one_run_lower_bound,  # Steinke, Nasr & Jagielski 2023 (statistics.py)
    "f-DP": fdp_lower_bound,  # Mahloujifar, Melis & Chaudhuri 2024, Gaussian family (fdp.py)
}


@dataclass(frozen=True)
class AuditSettings:
    """The public settings of an audited run: the privacy settings plus the audit's own.

    Attributes:
        num_canaries: ``m``, each included in the training set with probability 1/2.
        sample_rate: ``q``, Poisson inclusion probability per step.
        noise_multiplier: ``sigma``; the noise std per step is ``sigma * max_grad_norm``.
        max_grad_norm: ``C``, the flat per-sample clipping bound.
        steps: ``T``, the number of noisy releases.
        delta: the delta at which the accountant's epsilon and the lower bound are stated.
        confidence: confidence of the lower bound (default 0.95).
    """

    num_canaries: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    delta: float
    confidence: float = 0.95

    def __post_init__(self) -> None:
        _validate.positive_int("num_canaries", self.num_canaries, "Pass e.g. 1000.")
        _validate.unit_interval_right_closed("sample_rate", self.sample_rate,
                                             "Pass the Poisson sample rate of the run.")
        _validate.positive("noise_multiplier", self.noise_multiplier,
                           "An audit needs noise: pass the run's noise_multiplier (> 0).")
        _validate.positive("max_grad_norm", self.max_grad_norm, "Pass the run's clipping bound.")
        _validate.positive_int("steps", self.steps, "Train at least one step before auditing.")
        _validate.open_unit("delta", self.delta, "Pass e.g. 1e-5.")
        _validate.open_unit("confidence", self.confidence, "Pass e.g. 0.95.")


@dataclass(frozen=True)
class GuessRule:
    """How many guesses to make: one ``(num_positive, num_negative)`` pair fixed in advance, or
    the best of several with a Bonferroni correction.

    Attributes:
        candidates: the pairs; one pair means fixed guesses.
        chosen_by: how the pairs were picked (for the report), e.g. ``"chosen by simulation"``.
    """

    candidates: tuple[tuple[int, int], ...]
    chosen_by: str = "given"

    @property
    def bonferroni(self) -> bool:
        return len(self.candidates) > 1

    def describe(self) -> str:
        if not self.bonferroni:
            return f"fixed in advance, {self.chosen_by}"
        return f"best of {len(self.candidates)} guess counts, Bonferroni-corrected"


@dataclass(frozen=True)
class Band:
    """Lower bounds of a correct implementation: central ``coverage`` interval of simulations.

    Attributes:
        low, median, high: quantiles ``(1 - coverage) / 2``, 0.5, ``(1 + coverage) / 2``.
        coverage: the probability mass inside ``[low, high]``.
        simulations: number of simulated runs.
    """

    low: float
    median: float
    high: float
    coverage: float
    simulations: int

    def contains(self, value: float) -> bool:
        return self.low - 1e-9 <= value <= self.high + 1e-9


def simulate_scores(settings: AuditSettings, simulations: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(included, scores)``, each ``(simulations, m)``: canary scores in units of ``C``."""
    s, m = simulations, settings.num_canaries
    included = rng.random((s, m)) < 0.5
    counts = rng.binomial(settings.steps, settings.sample_rate, size=(s, m)) * included
    noise = rng.standard_normal((s, m)) * (settings.noise_multiplier * math.sqrt(settings.steps))
    return included, counts + noise


def lower_bounds(scores: np.ndarray, included: np.ndarray, rule: GuessRule, settings: AuditSettings,
                 method: str = "one-run") -> np.ndarray:
    """The audited lower bound of every row of ``scores`` under ``rule``, by ``method`` (a key of
    ``METHODS``); the best of several candidates is tested at a Bonferroni-corrected level."""
    bound = METHODS[_validate.choice("method", method, METHODS)]
    scores, included = np.atleast_2d(scores), np.atleast_2d(included)
    m, n = settings.num_canaries, len(rule.candidates)
    conf = 1.0 - (1.0 - settings.confidence) / n
    best = np.full(scores.shape[0], -1.0)
    for kp, kn in rule.candidates:
        correct = np.atleast_1d(count_correct(make_guesses(scores, kp, kn), included))
        found = np.array([bound(m, kp + kn, int(v), settings.delta, conf) for v in correct])
        best = np.maximum(best, found)
    return best


def default_candidates(num_canaries: int) -> tuple[tuple[int, int], ...]:
    """Symmetric guess counts ``k`` in + ``k`` out, from 0.5% to 20% of the canaries each."""
    fractions = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2)
    ks = sorted({max(1, round(f * num_canaries)) for f in fractions})
    return tuple((k, k) for k in ks if 2 * k <= num_canaries)


def choose_guesses(settings: AuditSettings, rng: np.random.Generator, *,
                   candidates: Sequence[tuple[int, int]] | None = None,
                   simulations: int = 200, method: str = "one-run") -> GuessRule:
    """Fix the guess counts in advance: the candidate with the highest mean simulated bound
    (computed by ``method``).

    Privacy:
        Uses the public settings and fresh randomness only, never the audited run, so the
        chosen guesses need no multiple-testing correction.
    """
    candidates = tuple(candidates) if candidates is not None else default_candidates(
        settings.num_canaries)
    included, scores = simulate_scores(settings, simulations, rng)
    best, best_mean = candidates[0], -1.0
    for pair in candidates:
        mean = float(lower_bounds(scores, included, GuessRule((pair,)), settings, method).mean())
        if mean > best_mean:
            best, best_mean = pair, mean
    return GuessRule((tuple(int(k) for k in best),), chosen_by="chosen by simulation")


def simulate_band(settings: AuditSettings, rule: GuessRule, rng: np.random.Generator, *,
                  simulations: int = 2000, coverage: float = 0.998,
                  method: str = "one-run") -> Band:
    """The central ``coverage`` interval of the bounds (by ``method``) a correct implementation
    yields."""
    simulations = _validate.positive_int("simulations", simulations, "Pass e.g. 1000.")
    coverage = _validate.open_unit("coverage", coverage, "Pass e.g. 0.99.")
    bounds = np.empty(simulations)
    chunk = max(1, 2_000_000 // settings.num_canaries)  # bound memory at ~2e6 scores at once
    for start in range(0, simulations, chunk):
        n = min(chunk, simulations - start)
        included, scores = simulate_scores(settings, n, rng)
        bounds[start:start + n] = lower_bounds(scores, included, rule, settings, method)
    lo, mid, hi = np.quantile(bounds, [(1 - coverage) / 2, 0.5, (1 + coverage) / 2])
    return Band(float(lo), float(mid), float(hi), coverage, simulations)
