"""The amplification reduction: the event's structure, epsilon against dp_accounting built
directly (PLD and RDP), and b = 1 is DP-SGD's event."""

from __future__ import annotations

import math

import dp_accounting
import pytest

from privgrad.accounting import make_accountant
from privgrad.accounting.events import (
    Composed,
    PoissonGaussian,
    Repeated,
    flatten,
    to_dp_event,
)
from privgrad.mechanisms import BLT, DPSGD, BandMF, amplified_event
from privgrad.mechanisms.accounting import rounds, starts_round

DELTA = 1e-5


@pytest.mark.parametrize("steps,bands,expected", [(10, 1, 10), (10, 4, 3), (12, 4, 3), (12, 12, 1),
                                                  (1, 1, 1), (1000, 16, 63)])
def test_rounds_are_the_ceiling(steps, bands, expected):
    assert rounds(steps, bands) == expected
    assert sum(starts_round(t, bands) for t in range(steps)) == expected
    event = amplified_event(1.1, 0.01, steps, bands)
    assert event == Repeated(PoissonGaussian(1.1, 0.01), expected)


def test_one_band_is_dpsgds_event():
    """What the engine records for DP-SGD today: one PoissonGaussian per step."""
    steps, sigma, q = 37, 0.9, 0.02
    per_step = Composed(tuple(PoissonGaussian(sigma, q) for _ in range(steps)))
    assert flatten(amplified_event(sigma, q, steps, 1)) == flatten(per_step)
    assert DPSGD().event(sigma, q, steps) == amplified_event(sigma, q, steps, 1)
    assert BandMF(num_bands=1).event(sigma, q, steps) == DPSGD().event(sigma, q, steps)


def reference_epsilon(kind: str, sigma: float, q: float, count: int) -> float:
    """dp_accounting on the reduced event, built here without privgrad."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count)
    accountant = (dp_accounting.pld.PLDAccountant() if kind == "pld"
                  else dp_accounting.rdp.RdpAccountant())
    return accountant.compose(event).get_epsilon(DELTA)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize("sigma,q,steps,bands", [
    (1.0, 0.01, 1000, 1), (1.0, 0.05, 1000, 10), (1.5, 0.1, 2000, 16), (2.0, 0.2, 500, 50),
    (0.9, 0.5, 64, 64),
])
def test_epsilon_equals_dp_accounting_on_the_reduced_event(kind, sigma, q, steps, bands):
    accountant = make_accountant(kind)
    accountant.compose(BandMF(num_bands=bands).event(sigma, q, steps))
    ours = accountant.get_epsilon(DELTA)
    ref = reference_epsilon(kind, sigma, q, math.ceil(steps / bands))
    assert abs(ours - ref) <= max(0.01, 0.01 * ref)


def test_the_event_converts_to_dp_accounting():
    converted = to_dp_event(amplified_event(1.0, 0.1, 100, 8))
    assert converted == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 13)


def test_more_bands_cost_less_epsilon_at_the_same_rate():
    eps = []
    for bands in (1, 4, 16):
        accountant = make_accountant("pld")
        accountant.compose(amplified_event(1.0, 0.05, 1024, bands))
        eps.append(accountant.get_epsilon(DELTA))
    assert eps[0] > eps[1] > eps[2]


def test_blt_records_one_gaussian_for_the_run():
    assert BLT(num_buffers=2).event(1.3, 0.01, 500) == Repeated(PoissonGaussian(1.3, 1.0), 1)
