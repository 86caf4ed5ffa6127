"""Conformance tests on the white-box canary coordinates (NumPy only, no torch).

A correct DP-SGD run releases, on every excluded canary's coordinate, pure noise
``N(0, (sigma C)^2)`` at every step, and on an included canary's coordinate that noise plus
exactly ``C`` at the steps whose Poisson batch held it; included canaries are sampled at rate
``q`` with ``Binomial(T, q)`` counts, excluded ones never. Each test returns a ``TestResult``
with a p-value under that claim (``privgrad.auditing.statistics``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from privgrad.auditing.statistics import (
    TestResult,
    binomial_test,
    difference_test,
    dispersion_test,
    mean_test,
    variance_test,
)

if TYPE_CHECKING:
    from privgrad.auditing.report import Observations
    from privgrad.auditing.simulation import AuditSettings

__all__ = ["conformance_tests"]


def conformance_tests(obs: Observations, settings: AuditSettings) -> tuple[TestResult, ...]:
    """The tests on the canary coordinates of ``obs`` (see the module docstring)."""
    c, sigma, q = settings.max_grad_norm, settings.noise_multiplier, settings.sample_rate
    std = sigma * c
    released = np.asarray(obs.released, dtype=np.float64)
    included = np.asarray(obs.included, dtype=bool)
    out_values = released[:, ~included]  # excluded canaries: pure noise at every step
    tests = [
        variance_test("noise_std", "per-step noise std = sigma*C", out_values, std),
        mean_test("noise_mean", "per-step noise mean = 0", out_values, 0.0, std),
    ]
    if obs.sampled is None:
        return tuple(tests)
    sampled = np.asarray(obs.sampled, dtype=bool)
    inc_values, inc_sampled = released[:, included], sampled[:, included]
    counts = inc_sampled.sum(0)
    tests += [
        difference_test("contribution", "a sampled canary adds C", inc_values[inc_sampled],
                        inc_values[~inc_sampled], c, std),
        binomial_test("inclusion_rate", "included canaries sampled at rate q",
                      int(counts.sum()), inc_sampled.size, q),
        dispersion_test("inclusion_spread", "counts ~ Binomial(T, q): variance ratio 1",
                        counts, obs.steps, q),
        binomial_test("excluded_unsampled", "excluded canaries are never sampled",
                      int(sampled[:, ~included].sum()), sampled[:, ~included].size, 0.0),
    ]
    return tuple(tests)
