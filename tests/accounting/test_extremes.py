"""The edges a first hour reaches: tiny targets, almost no noise, huge noise, and no crash.

Each case here once ended in a traceback (``math domain error``, ``OverflowError``) or a console
full of ``dp_accounting`` log lines.
"""

from __future__ import annotations

import logging
import math

import pytest

from privgrad.accounting import (
    PLDAccountant,
    RDPAccountant,
    epsilon_for,
    get_noise_multiplier,
    make_accountant,
)
from privgrad.accounting import pld as pld_module
from privgrad.accounting.pld import accounted_steps
from privgrad.errors import PrivacyBudgetError

MNIST = dict(sample_rate=256 / 60000, steps=2340)


def test_a_tiny_reachable_target_is_met():
    """With enough noise PLD's epsilon is exactly 0 (delta covers the mechanism): the search
    used to take log(0) there."""
    sigma = get_noise_multiplier(target_epsilon=1e-5, target_delta=1e-5, accountant="pld", **MNIST)
    kw = dict(delta=1e-5, accountant="pld", **MNIST)
    assert 0 <= epsilon_for(noise_multiplier=sigma, **kw) <= 1e-5
    assert epsilon_for(noise_multiplier=sigma / 1.005, **kw) > 1e-5  # and it is the smallest


def test_a_large_delta_reaches_epsilon_zero_without_a_crash():
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=0.5, sample_rate=0.18, steps=6)
    assert 0 <= epsilon_for(noise_multiplier=sigma, sample_rate=0.18, steps=6, delta=0.5) <= 3.0


def test_a_target_below_rdps_floor_is_a_budget_error_that_names_pld():
    with pytest.raises(PrivacyBudgetError, match=(
            r"target_epsilon must be reachable with noise_multiplier <= 10000; got target_epsilon=1e-05 .*"
            r"RDP accountant's conversion cannot certify epsilon below about 0\.0035 here; "
            r"accountant='pld' may reach lower\)\. Raise target_epsilon")):
        get_noise_multiplier(target_epsilon=1e-5, target_delta=1e-5, accountant="rdp", **MNIST)


@pytest.mark.parametrize("sigma", [1e-12, 1e-7, 1e-5, 3e-4])
@pytest.mark.parametrize("q, steps", [(0.004, 1), (0.004, 2340), (0.5, 100)])
def test_almost_no_noise_gives_a_finite_upper_bound(sigma, q, steps, monkeypatch):
    """dp_accounting overflows exp() building such a distribution, after seconds of work: beyond
    MAX_INTERVAL PLD does not try, and answers with the RDP bound, an upper bound too."""
    pld, rdp = PLDAccountant(), RDPAccountant()
    pld.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    rdp.step(noise_multiplier=sigma, sample_rate=q, num_steps=accounted_steps(steps))  # PLD's grid
    hopeless = pld.interval > pld_module.MAX_INTERVAL
    if hopeless:
        monkeypatch.setattr(pld_module, "_run", lambda *a: pytest.fail("built a hopeless distribution"))
    eps = pld.get_epsilon(delta=1e-5)
    assert 1e4 < eps < math.inf
    if hopeless:
        assert eps == rdp.get_epsilon(delta=1e-5)
    assert 0 <= pld.get_delta(epsilon=1.0) <= 1


def test_an_overflow_inside_dp_accounting_falls_back_to_rdp(monkeypatch):
    def overflow(*args):
        raise OverflowError("math range error")

    pld, rdp = PLDAccountant(), RDPAccountant()
    for acc in (pld, rdp):
        acc.step(noise_multiplier=0.01, sample_rate=0.004, num_steps=10)
    monkeypatch.setattr(pld_module, "_run", overflow)
    assert pld.get_epsilon(delta=1e-5) == rdp.get_epsilon(delta=1e-5)
    assert pld.get_delta(epsilon=10.0) == rdp.get_delta(epsilon=10.0)


def test_no_subsampling_and_almost_no_noise_is_a_number_not_a_warning():
    acc = PLDAccountant()
    acc.step(noise_multiplier=1e-12, sample_rate=1.0, num_steps=1)
    assert acc.get_epsilon(delta=1e-5) > 1e20  # warnings are errors here: none may escape


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_huge_noise_and_a_tiny_sample_rate_give_delta_without_a_crash(accountant):
    """dp_accounting's RDP conversion takes log1p(-exp(-rdp)), a math domain error once rdp is so
    small that exp(-rdp) rounds to 1."""
    acc = make_accountant(accountant)
    acc.step(noise_multiplier=1e4, sample_rate=1e-6, num_steps=1)
    assert 0 <= acc.get_delta(epsilon=1.0) < 1e-6
    assert acc.get_epsilon(delta=1e-5) == 0.0 or accountant == "rdp"


def test_huge_noise_at_a_large_sample_rate_logs_nothing(caplog):
    """Where neither series converges (sigma = 1e4, q = 0.5, orders near 1) dp_accounting logs a
    warning per order; the order is excluded (RDP inf), which is correct and not news."""
    with caplog.at_level(logging.WARNING):
        acc = RDPAccountant()
        acc.step(noise_multiplier=1e4 * (1 + 1e-9), sample_rate=0.5, num_steps=10)  # uncached
        assert acc.get_epsilon(delta=1e-5) < 0.01
    assert not caplog.records
