"""PLD specifics: the step grid, the chosen interval, and the large-epsilon fallback."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privgrad.accounting import PLDAccountant, RDPAccountant
from privgrad.accounting import pld as pld_module
from privgrad.accounting.pld import STEP_GRID, accounted_steps, choose_interval, loss_scale


@settings(max_examples=300, derandomize=True)
@given(st.integers(0, 10**9))
def test_step_grid_never_counts_fewer_and_at_most_0_4_percent_more(n):
    m = accounted_steps(n)
    assert n <= m <= n + n / STEP_GRID
    if n <= STEP_GRID:
        assert m == n


def test_step_grid_value_is_an_upper_bound_of_the_exact_count():
    grid, exact = PLDAccountant(), PLDAccountant(exact_steps=True)
    for acc in (grid, exact):
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1001)
    assert accounted_steps(1001) == 1002
    assert grid.get_epsilon(delta=1e-5) > exact.get_epsilon(delta=1e-5)
    assert grid.get_epsilon(delta=1e-5) <= exact.get_epsilon(delta=1e-5) * 1.002


def test_stepping_every_step_composes_only_at_grid_points(monkeypatch):
    composed = []

    def counting_run(sigma, q, n, interval):  # counts compositions; returns a cheap stand-in
        composed.append(n)
        return pld_module._single_step(sigma, q, interval)

    monkeypatch.setattr(pld_module, "_run", pld_module.lru_cache(maxsize=16)(counting_run))
    acc = PLDAccountant()
    for _ in range(600):
        acc.step(noise_multiplier=2.0, sample_rate=0.05)
        acc.get_epsilon(delta=1e-5)
        acc.get_epsilon(delta=1e-5)  # asked twice: the second answer is cached
    # exact counts up to 256, then one composition per grid point: 257..511 by 1, 512..600 by 2
    assert composed == list(range(1, 512)) + list(range(512, 601, 2))


def test_epsilon_asked_every_step_equals_a_fresh_accountant_bit_for_bit():
    # The run is built from power-of-two pieces whatever was asked before, so a resumed or
    # fresh accountant reports exactly what an accountant asked after every step reports.
    acc = PLDAccountant()
    seen = {}
    for n in range(1, 301):
        acc.step(noise_multiplier=1.0, sample_rate=0.02)
        seen[n] = acc.get_epsilon(delta=1e-5)
    pld_module._run.cache_clear()
    for n in (1, 7, 64, 255, 256, 257, 299, 300):
        fresh = PLDAccountant()
        fresh.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=n)
        assert fresh.get_epsilon(delta=1e-5) == seen[n]
    assert all(seen[n] < seen[n + 1] for n in range(1, 256))  # exact counts: strictly growing


def test_epsilon_between_grid_points_is_read_once(monkeypatch):
    reads = []
    original = PLDAccountant._compute_epsilon
    monkeypatch.setattr(PLDAccountant, "_compute_epsilon",
                        lambda self, delta: reads.append(self.steps) or original(self, delta))
    acc = PLDAccountant()
    acc.step(noise_multiplier=2.0, sample_rate=0.05, num_steps=1023)
    acc.get_epsilon(delta=1e-5)
    for _ in range(5):  # 1023 and 1024 are both counted as 1024; 1025..1028 as 1028
        acc.step(noise_multiplier=2.0, sample_rate=0.05)
        acc.get_epsilon(delta=1e-5)
    assert [accounted_steps(n) for n in (1023, 1024, 1025, 1028)] == [1024, 1024, 1028, 1028]
    assert reads == [1023, 1025]
    grid = PLDAccountant()
    grid.step(noise_multiplier=2.0, sample_rate=0.05, num_steps=1028)
    assert grid.get_epsilon(delta=1e-5) == acc.get_epsilon(delta=1e-5)


def test_interval_is_fine_against_one_step_and_capped_for_huge_runs():
    small = [(8.0, 1e-3, 100_000)]
    assert choose_interval(small) == pytest.approx(loss_scale(8.0, 1e-3) / pld_module.POINTS_PER_SCALE)
    assert choose_interval(small) < 1e-5  # dp_accounting's default 1e-4 is 40x coarser here
    huge = [(0.5, 0.5, 10**7)]
    spread = 10**7 * loss_scale(0.5, 0.5) ** 2 / 2
    assert choose_interval(huge) >= spread / pld_module.MAX_GRID_POINTS


def test_huge_epsilon_falls_back_to_rdp_instead_of_inf():
    """dp_accounting's epsilon search overflows to inf near epsilon ~ 700 (sigma = 0.5, q = 0.5,
    783 steps; an independent reference says 709.6). We report the finite RDP bound."""
    pld, rdp = PLDAccountant(exact_steps=True), RDPAccountant()
    for acc in (pld, rdp):
        acc.step(noise_multiplier=0.5, sample_rate=0.5, num_steps=783)
    eps = pld.get_epsilon(delta=1e-5)
    assert math.isfinite(eps)
    assert 709.6 <= eps <= rdp.get_epsilon(delta=1e-5)
    # get_delta at such epsilon must not come back optimistic (dp_accounting's exp overflows)
    assert pld.get_delta(epsilon=600.0) == rdp.get_delta(epsilon=600.0) > 0
