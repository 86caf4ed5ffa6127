"""Privacy events: frozen, validated, flattened in order, and handed to dp_accounting unchanged."""

from __future__ import annotations

import dataclasses

import dp_accounting
import pytest
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

from privgrad.accounting import (
    Composed,
    HistoryEntry,
    PLDAccountant,
    PoissonGaussian,
    RDPAccountant,
    Repeated,
    flatten,
    to_dp_event,
)
from privgrad.errors import ConfigError, ConfigTypeError

SCHEDULE = Composed(
    (
        Repeated(PoissonGaussian(1.2, 0.01), 40),
        Repeated(PoissonGaussian(1.2, 0.01), 10),  # merges with the run before
        Repeated(Composed((PoissonGaussian(0.9, 0.02), PoissonGaussian(2.0, 0.02))), 3),
        Repeated(PoissonGaussian(1.0, 1.0), 5),  # a full-batch phase
    )
)


def test_events_are_frozen_values():
    step = PoissonGaussian(1.0, 0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.noise_multiplier = 2.0  # type: ignore[misc]
    assert step == PoissonGaussian(1, 0.01)
    assert hash(step) == hash(PoissonGaussian(1.0, 0.01))


def test_flatten_keeps_order_and_merges_equal_neighbours():
    assert flatten(SCHEDULE) == (
        HistoryEntry(1.2, 0.01, 50),
        HistoryEntry(0.9, 0.02, 1),
        HistoryEntry(2.0, 0.02, 1),
        HistoryEntry(0.9, 0.02, 1),
        HistoryEntry(2.0, 0.02, 1),
        HistoryEntry(0.9, 0.02, 1),
        HistoryEntry(2.0, 0.02, 1),
        HistoryEntry(1.0, 1.0, 5),
    )
    assert flatten(Repeated(PoissonGaussian(1.0, 0.1), 0)) == ()


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: PoissonGaussian(-1.0, 0.1), ConfigError, "noise_multiplier must be finite and >= 0; got noise_multiplier=-1.0"),
        (lambda: PoissonGaussian(1.0, 0.0), ConfigError, r"sample_rate must be in \(0, 1\]; got sample_rate=0.0"),
        (lambda: Repeated(PoissonGaussian(1.0, 0.1), -2), ConfigError, "count must be >= 0; got count=-2"),
        (lambda: Repeated("step", 2), ConfigTypeError, "event must be a PoissonGaussian, Repeated or Composed event; got event='step'"),
        (lambda: Composed((PoissonGaussian(1.0, 0.1), 3)), ConfigTypeError, r"events\[1\] must be a PoissonGaussian"),
        (lambda: Composed(PoissonGaussian(1.0, 0.1)), ConfigTypeError, "events must be a sequence of events"),
    ],
)
def test_bad_events_are_refused(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_rdp_equals_dp_accounting_on_the_converted_event():
    """Our layer adds nothing to dp_accounting's RDP at integer orders (where it is exact)."""
    orders = tuple(float(a) for a in range(2, 64)) + (128.0, 256.0)
    ours = RDPAccountant(orders=orders)
    ours.compose(SCHEDULE)
    theirs = dp_rdp.RdpAccountant(orders=list(orders))
    theirs.compose(to_dp_event(SCHEDULE))
    assert ours.get_epsilon(delta=1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-10)


def test_pld_equals_dp_accounting_at_a_fixed_interval():
    ours = PLDAccountant(interval=1e-3, exact_steps=True)
    ours.compose(SCHEDULE)
    theirs = dp_pld.PLDAccountant(value_discretization_interval=1e-3)
    theirs.compose(to_dp_event(SCHEDULE))
    assert ours.get_epsilon(delta=1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-9)


def test_accountant_event_round_trips():
    acc = RDPAccountant()
    acc.compose(SCHEDULE)
    assert flatten(acc.event) == acc.history
    assert isinstance(to_dp_event(acc.event), dp_accounting.ComposedDpEvent)


def test_full_batch_step_converts_to_a_plain_gaussian():
    assert to_dp_event(PoissonGaussian(2.0, 1.0)) == dp_accounting.GaussianDpEvent(2.0)
    assert to_dp_event(PoissonGaussian(2.0, 0.5)) == dp_accounting.PoissonSampledDpEvent(
        0.5, dp_accounting.GaussianDpEvent(2.0)
    )


def test_pld_interval_is_validated():
    with pytest.raises(ConfigError, match="interval must be > 0 and finite; got interval=0.0"):
        PLDAccountant(interval=0.0)
    with pytest.raises(ConfigTypeError, match="exact_steps must be a bool; got exact_steps='yes'"):
        PLDAccountant(exact_steps="yes")  # type: ignore[arg-type]
