"""Truncated Poisson sampling's accounting (max_batch_size=M): the PLD accountant against
dp_accounting's TruncatedSubsampledGaussianDpEvent, the RDP bound against it and against the
untruncated step, the history, and the expected share that truncation drops."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest

from privgrad.accounting import make_accountant
from privgrad.accounting.events import (
    PoissonGaussian,
    Repeated,
    TruncatedEntry,
    TruncatedPoissonGaussian,
    to_dp_event,
)
from privgrad.accounting.truncated import expected_dropped_share, truncation_probability
from privgrad.errors import ConfigError

GRID = [  # (sigma, q, N, M, steps, delta)
    (1.0, 0.01, 10_000, 110, 100, 1e-5),
    (1.0, 0.01, 10_000, 140, 1000, 1e-5),
    (0.8, 0.05, 2_000, 100, 50, 1e-5),
    (2.0, 0.1, 1_000, 90, 20, 1e-6),
    (1.0, 0.004, 60_000, 300, 300, 1e-6),
]


def _epsilon(name, event, delta):
    acc = make_accountant(name)
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, n, m, steps, delta", GRID)
def test_pld_matches_dp_accounting_truncated_event(sigma, q, n, m, steps, delta):
    event = Repeated(TruncatedPoissonGaussian(sigma, q, n, m), steps)
    reference = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(to_dp_event(event))
    want = reference.get_epsilon(delta)
    got = _epsilon("pld", event, delta)
    assert abs(got - want) <= max(0.01, 0.01 * want), (got, want)


@pytest.mark.parametrize("sigma, q, n, m, steps, delta", GRID)
def test_rdp_is_an_upper_bound_above_the_untruncated_step(sigma, q, n, m, steps, delta):
    truncated = _epsilon("rdp", Repeated(TruncatedPoissonGaussian(sigma, q, n, m), steps), delta)
    plain = _epsilon("rdp", Repeated(PoissonGaussian(sigma, q), steps), delta)
    pld = _epsilon("pld", Repeated(TruncatedPoissonGaussian(sigma, q, n, m), steps), delta)
    assert truncated >= plain and truncated >= pld * 0.99


def test_no_truncation_possible_is_the_poisson_step():
    for name in ("pld", "rdp"):
        a = _epsilon(name, Repeated(TruncatedPoissonGaussian(1.0, 0.02, 500, 500), 50), 1e-5)
        b = _epsilon(name, Repeated(PoissonGaussian(1.0, 0.02), 50), 1e-5)
        assert a == pytest.approx(b, rel=1e-9)


def test_epsilon_falls_as_the_cap_rises():
    eps = [_epsilon(name, Repeated(TruncatedPoissonGaussian(1.0, 0.01, 10_000, m), 200), 1e-5)
           for name in ("pld", "rdp") for m in (105, 120, 150)]
    assert eps[0] > eps[1] > eps[2] and eps[3] > eps[4] > eps[5]


def test_history_keeps_truncated_steps_apart_and_round_trips():
    acc = make_accountant("rdp")
    acc.compose(Repeated(TruncatedPoissonGaussian(1.0, 0.01, 1000, 20), 3))
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=2)
    acc.compose(TruncatedPoissonGaussian(1.0, 0.01, 1000, 20))
    assert acc.history == (TruncatedEntry(1.0, 0.01, 3, 1000, 20), (1.0, 0.01, 2),
                           TruncatedEntry(1.0, 0.01, 1, 1000, 20))
    again = make_accountant("rdp")
    again.load_state_dict(acc.state_dict())
    assert again.history == acc.history and again.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    pld = make_accountant("pld")
    pld.compose(acc.event)
    assert pld.history == acc.history


def test_bad_truncated_events_are_refused():
    with pytest.raises(ConfigError, match="max_batch_size=0"):
        TruncatedPoissonGaussian(1.0, 0.1, 100, 0)
    with pytest.raises(ConfigError, match="dataset_size=-1"):
        TruncatedPoissonGaussian(1.0, 0.1, -1, 5)


def test_truncation_probability_and_dropped_share_against_simulation():
    rng = np.random.default_rng(0)
    n, q, m = 400, 0.05, 22
    sizes = rng.binomial(n, q, 200_000)
    dropped = np.maximum(sizes - m, 0).sum() / sizes.sum()
    assert expected_dropped_share(n, q, m) == pytest.approx(dropped, rel=0.03)
    others = rng.binomial(n - 1, q, 200_000)
    assert truncation_probability(n, q, m) == pytest.approx((others >= m).mean(), rel=0.03)
    assert expected_dropped_share(n, q, n) == 0.0 and truncation_probability(n, q, n) == 0.0
