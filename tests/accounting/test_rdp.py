"""RDP accountant: per-order values against high-precision integration, Opacus, golden value."""

from __future__ import annotations

import logging
import math
import warnings

import mpmath
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp

from privgrad.accounting import RDPAccountant
from privgrad.accounting.rdp import DEFAULT_ORDERS, rdp_per_step


def rdp_by_integration(q: float, sigma: float, alpha: float) -> float:
    """RDP of order alpha of one Poisson-subsampled Gaussian step, by 40-digit quadrature.

    A_alpha = E_{x ~ N(0, s^2)} [(1 - q + q exp((2x - 1) / (2 s^2)))^alpha] is the larger of the
    two neighbour directions (Mironov et al. 2019, Thm. 5); RDP = log(A_alpha) / (alpha - 1).
    """
    with mpmath.workdps(40):
        q_, s, a = mpmath.mpf(q), mpmath.mpf(sigma), mpmath.mpf(alpha)

        def integrand(x):
            return mpmath.npdf(x, 0, s) * ((1 - q_) + q_ * mpmath.exp((2 * x - 1) / (2 * s * s))) ** a

        # split where the integrand's mass sits: around 0 and, for large alpha, far right
        peak = float(alpha) / 1.0
        points = [-mpmath.inf, -12 * s, -3 * s, 0, 0.5, 3 * s, 12 * s, peak, 2 * peak + 12 * s, mpmath.inf]
        points = sorted(set(points), key=lambda v: float(v))
        return float(mpmath.log(mpmath.quad(integrand, points)) / (a - 1))


# (sample_rate, noise_multiplier, order): fractional orders at small sigma are the trap
POINTS = [
    (0.04, 1.5, 3.9),  # the golden value's optimal order
    (0.04, 1.5, 4.0),
    (0.1, 0.5, 1.2),
    (0.1, 0.5, 1.5),
    (0.3, 0.6, 1.3),
    (0.01, 0.7, 1.6),
    (0.001, 10.0, 10.5),
    (0.001, 2.0, 32.0),
    (0.5, 1.0, 2.5),
    (0.2, 0.8, 1.1),
    (0.01, 5.0, 63.0),
]


@pytest.mark.parametrize("q, sigma, alpha", POINTS)
def test_per_order_rdp_matches_integration(q, sigma, alpha):
    curve = rdp_per_step(noise_multiplier=sigma, sample_rate=q, orders=(alpha,))
    assert curve[0] == pytest.approx(rdp_by_integration(q, sigma, alpha), rel=1e-7, abs=1e-14)


def test_dp_accounting_fractional_orders_are_the_trap_we_avoid(caplog):
    """dp_accounting 0.6.0 returns inf at sigma = 0.5, order 1.5, and 9% too much at sigma = 0.7,
    order 1.6. If a new release fixes this, our own series can go."""
    with caplog.at_level(logging.ERROR):
        assert math.isinf(dp_rdp._compute_rdp_poisson_subsampled_gaussian(0.1, 0.5, [1.5])[0])
        loose = dp_rdp._compute_rdp_poisson_subsampled_gaussian(0.01, 0.7, [1.6])[0]
    assert loose > 1.05 * rdp_by_integration(0.01, 0.7, 1.6)
    ours = rdp_per_step(noise_multiplier=0.5, sample_rate=0.1, orders=(1.5,))[0]
    assert math.isfinite(ours)


def test_every_default_order_is_finite_at_small_noise():
    for sigma in (0.3, 0.5, 0.8):
        for q in (1e-3, 0.1, 0.9):
            curve = rdp_per_step(noise_multiplier=sigma, sample_rate=q)
            assert np.isfinite(curve).all() and (curve > 0).all(), (sigma, q)


def test_golden_value():
    """The public RDP value for sigma = 1.5, q = 0.04, 2250 steps, delta = 1e-5 (Opacus, TF Privacy)."""
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.5, sample_rate=0.04, num_steps=2250)
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(7.3291, abs=5e-5)


def test_rdp_is_linear_in_steps_and_additive_over_runs():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=70)
    acc.step(noise_multiplier=2.0, sample_rate=0.1, num_steps=30)
    expected = 70 * rdp_per_step(noise_multiplier=1.0, sample_rate=0.01) + 30 * rdp_per_step(
        noise_multiplier=2.0, sample_rate=0.1
    )
    np.testing.assert_allclose(acc.rdp, expected, rtol=1e-12)


def test_full_batch_rdp_is_the_gaussian_curve():
    curve = rdp_per_step(noise_multiplier=2.0, sample_rate=1.0)
    np.testing.assert_allclose(curve, np.array(DEFAULT_ORDERS) / (2 * 2.0**2), rtol=1e-12)


def test_orders_are_validated():
    from privgrad.errors import ConfigError

    with pytest.raises(ConfigError, match="orders must be finite and > 1; got orders="):
        RDPAccountant(orders=(1.0, 2.0))


@pytest.mark.slow
@pytest.mark.parametrize("q", [1e-3, 0.04, 0.5, 1.0])
@pytest.mark.parametrize("sigma", [0.5, 0.8, 2.0, 10.0])
def test_matches_opacus_rdp_on_opacus_orders(q, sigma):
    """Opacus 1.6's RDP accountant (TF Privacy lineage, its own code) on its own orders."""
    opacus_rdp = pytest.importorskip("opacus.accountants.rdp")
    for steps, delta in ((1, 1e-5), (1000, 1e-5), (100_000, 1e-6)):
        theirs = opacus_rdp.RDPAccountant()
        theirs.history = [(sigma, q, steps)]
        with warnings.catch_warnings():  # Opacus warns when the optimum is an end order
            warnings.simplefilter("ignore", UserWarning)
            expected = theirs.get_epsilon(delta=delta)
        ours = RDPAccountant(orders=tuple(opacus_rdp.RDPAccountant.DEFAULT_ALPHAS))
        ours.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        assert ours.get_epsilon(delta=delta) == pytest.approx(expected, rel=1e-6), (steps, delta)
