"""``privgrad.opacus.accountants``: Opacus's accountant names and calls over privgrad's
accountants, and ``get_noise_multiplier`` over privgrad's calibration."""

import logging

import pytest

import privgrad
import privgrad.opacus as opacus
from privgrad.errors import CheckpointError, ConfigError, PrivacyStateError
from privgrad.opacus.accountants import accountant as adapter
from privgrad.opacus.accountants import (
    GaussianAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
    get_noise_multiplier,
)
from privgrad.opacus.accountants.utils import get_noise_multiplier as from_utils


@pytest.mark.parametrize("mechanism, kind", [("prv", "pld"), ("gdp", "pld"), ("rdp", "rdp"),
                                             ("pld", "pld")])
def test_each_opacus_name_is_served_by_a_privgrad_accountant(mechanism, kind):
    engine = opacus.PrivacyEngine(accountant=mechanism)
    assert engine.privgrad_engine.accountant.name == kind
    assert engine.accountant.mechanism() == mechanism
    assert create_accountant(mechanism).privgrad_accountant.name == kind


@pytest.mark.parametrize("mechanism", ["prv", "gdp"])
def test_the_substitution_is_said_once_per_process(mechanism, caplog, monkeypatch):
    monkeypatch.setattr(adapter, "_NOTED", set())
    with caplog.at_level(logging.INFO, logger="privgrad"):
        opacus.PrivacyEngine(accountant=mechanism)
        opacus.PrivacyEngine(accountant=mechanism)
    said = [r.getMessage() for r in caplog.records if "served by privgrad's PLD" in r.getMessage()]
    assert said == [f"privgrad.opacus: accountant={mechanism!r} is served by privgrad's PLD "
                    f"accountant (a tight numerical accountant; see docs/migration.md)"]


def test_an_unknown_accountant_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"accountant must be one of 'prv', 'rdp', 'gdp', 'pld'"):
        opacus.PrivacyEngine(accountant="moments")


def test_history_len_steps_and_epsilon_as_opacus_reads_them():
    acc = RDPAccountant()
    assert len(acc) == 0 and acc.history == [] and acc.get_epsilon(1e-5) == 0.0
    for _ in range(3):
        acc.step(noise_multiplier=1.1, sample_rate=0.01)
    acc.step(noise_multiplier=0.9, sample_rate=0.01)
    assert acc.history == [(1.1, 0.01, 3), (0.9, 0.01, 1)] and isinstance(acc.history, list)
    assert len(acc) == 2  # Opacus's len: history entries, not steps
    reference = privgrad.RDPAccountant()
    reference.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=3)
    reference.step(noise_multiplier=0.9, sample_rate=0.01)
    assert acc.get_epsilon(1e-5) == reference.get_epsilon(1e-5)
    assert acc.get_epsilon(1e-5, eps_error=0.01, alphas=[2, 4]) == reference.get_epsilon(1e-5)


def test_rdp_privacy_spent_gives_epsilon_and_the_best_order():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.05)
    epsilon, order = acc.get_privacy_spent(delta=1e-5)
    assert epsilon == acc.get_epsilon(1e-5) and order in acc.privgrad_accountant.orders


def test_a_standalone_history_can_be_assigned_and_is_checked():
    acc = PRVAccountant()
    acc.history = [(1.0, 0.1, 100)]
    assert acc.get_epsilon(1e-5) == pytest.approx(
        privgrad.accounting.epsilon_for(noise_multiplier=1.0, sample_rate=0.1, steps=100,
                                        delta=1e-5, accountant="pld"))
    with pytest.raises(CheckpointError, match=r"history\[0\] is invalid"):
        acc.history = [(1.0, 1.5, 1)]
    assert acc.history == [(1.0, 0.1, 100)]  # unchanged


def test_the_engines_history_is_its_record_and_cannot_be_assigned():
    engine = opacus.PrivacyEngine()
    with pytest.raises(PrivacyStateError, match="record of the steps it released"):
        engine.accountant.history = []


def test_state_dict_round_trips_and_refuses_another_kind():
    acc = GaussianAccountant()
    acc.step(noise_multiplier=2.0, sample_rate=0.5)
    other = GaussianAccountant()
    other.load_state_dict(acc.state_dict())
    assert other.history == acc.history and other.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    assert acc.state_dict({"kept": 1})["kept"] == 1
    with pytest.raises(CheckpointError, match="from a 'pld' accountant; got accountant='rdp'"):
        other.load_state_dict(RDPAccountant().state_dict())


def test_the_optimizer_hook_steps_at_the_optimizers_noise():
    acc = RDPAccountant()
    hook = acc.get_optimizer_hook_fn(sample_rate=0.02)
    hook(type("Optimizer", (), {"noise_multiplier": 1.3})())
    assert acc.history == [(1.3, 0.02, 1)]
    with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\]"):
        acc.get_optimizer_hook_fn(sample_rate=2.0)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_get_noise_multiplier_with_epochs_meets_the_target(accountant):
    sigma = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01,
                                 epochs=3, accountant=accountant, epsilon_tolerance=0.01)
    kind = {"rdp": "rdp", "prv": "pld"}[accountant]
    steps = 3 * 100  # round(1 / q) steps an epoch
    assert sigma == privgrad.get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5,
                                                  sample_rate=0.01, steps=steps, accountant=kind)
    assert privgrad.accounting.epsilon_for(noise_multiplier=sigma, sample_rate=0.01, steps=steps,
                                           delta=1e-5, accountant=kind) <= 2.0
    assert from_utils is get_noise_multiplier


def test_get_noise_multiplier_defaults_to_rdp_as_opacus_does():
    given = dict(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=500)
    assert get_noise_multiplier(**given) == privgrad.get_noise_multiplier(**given, accountant="rdp")


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 1, "steps": 10}, r"exactly one of epochs and steps must be given"),
    ({}, r"exactly one of epochs and steps must be given; got \(epochs, steps\)=\(None, None\)"),
    ({"steps": 10, "poisson": True}, r"got keywords=\['poisson'\]"),
])
def test_get_noise_multiplier_refuses_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, **kwargs)
