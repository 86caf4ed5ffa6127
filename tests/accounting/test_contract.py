"""The contract every accountant honours: one test class, inherited once per accountant."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from privgrad.accounting import (
    ACCOUNTANTS,
    Composed,
    PLDAccountant,
    PoissonGaussian,
    RDPAccountant,
    Repeated,
    make_accountant,
)
from privgrad.errors import CheckpointError, ConfigError, ConfigTypeError


class AccountantContract:
    """Inherit and set ``name``; every test here must hold for that accountant."""

    name: str

    def make(self):
        return make_accountant(self.name)

    def test_name_and_kind(self):
        acc = self.make()
        assert acc.name == self.name
        assert isinstance(acc, ACCOUNTANTS[self.name])

    def test_before_first_step(self):
        acc = self.make()
        assert acc.steps == 0
        assert acc.history == ()
        assert acc.get_epsilon(delta=1e-5) == 0.0
        assert acc.get_delta(epsilon=1.0) == 0.0

    def test_epsilon_positive_and_grows(self):
        acc = self.make()
        acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=100)
        first = acc.get_epsilon(delta=1e-5)
        acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=900)
        second = acc.get_epsilon(delta=1e-5)
        assert 0 < first < second < math.inf

    def test_step_is_keyword_only(self):
        acc = self.make()
        with pytest.raises(TypeError):
            acc.step(1.1, 0.01)  # type: ignore[misc]

    def test_steps_and_history_merge_equal_runs(self):
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=4)
        acc.step(noise_multiplier=2.0, sample_rate=0.01, num_steps=3)
        acc.step(noise_multiplier=2.0, sample_rate=0.01, num_steps=0)
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=2)
        assert acc.steps == 10
        assert acc.history == ((1.0, 0.01, 5), (2.0, 0.01, 3), (1.0, 0.01, 2))
        assert isinstance(acc.steps, int)

    def test_one_call_equals_many_calls(self):
        bulk, single = self.make(), self.make()
        bulk.step(noise_multiplier=1.3, sample_rate=0.02, num_steps=50)
        for _ in range(50):
            single.step(noise_multiplier=1.3, sample_rate=0.02)
        assert single.history == bulk.history
        assert single.get_epsilon(delta=1e-5) == pytest.approx(bulk.get_epsilon(delta=1e-5), rel=1e-9)

    def test_compose_event_equals_steps(self):
        by_steps, by_event = self.make(), self.make()
        by_steps.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=30)
        by_steps.step(noise_multiplier=0.8, sample_rate=0.02, num_steps=20)
        by_event.compose(
            Composed((Repeated(PoissonGaussian(1.0, 0.01), 30), Repeated(PoissonGaussian(0.8, 0.02), 20)))
        )
        assert by_event.history == by_steps.history
        assert by_event.get_epsilon(delta=1e-5) == by_steps.get_epsilon(delta=1e-5)
        again = self.make()
        again.compose(by_steps.event)
        assert again.history == by_steps.history

    def test_zero_noise_is_infinite_not_a_crash(self):
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
        acc.step(noise_multiplier=0.0, sample_rate=0.01)
        assert acc.get_epsilon(delta=1e-5) == math.inf
        assert acc.get_delta(epsilon=5.0) == 1.0

    def test_delta_and_epsilon_are_inverse(self):
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
        eps = acc.get_epsilon(delta=1e-5)
        assert acc.get_delta(epsilon=eps) <= 1e-5 * 1.001
        assert acc.get_delta(epsilon=eps * 0.9) > 1e-5

    def test_get_epsilon_is_cached_until_next_step(self):
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
        first = acc.get_epsilon(delta=1e-5)
        acc._compute_epsilon = None  # a second computation would now crash
        assert acc.get_epsilon(delta=1e-5) == first
        del acc._compute_epsilon
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
        assert acc.get_epsilon(delta=1e-5) > first

    def test_state_dict_round_trips_through_json(self):
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=30)
        acc.step(noise_multiplier=0.9, sample_rate=0.05, num_steps=7)
        state = json.loads(json.dumps(acc.state_dict()))
        fresh = self.make()
        fresh.load_state_dict(state)
        assert fresh.history == acc.history
        assert fresh.steps == acc.steps
        assert fresh.get_epsilon(delta=1e-6) == acc.get_epsilon(delta=1e-6)
        fresh.step(noise_multiplier=1.0, sample_rate=0.01)
        assert fresh.steps == acc.steps + 1

    def test_load_state_dict_replaces_history(self):
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=30)
        state = acc.state_dict()
        acc.step(noise_multiplier=1.0, sample_rate=0.5, num_steps=30)
        acc.load_state_dict(state)
        assert acc.history == ((1.0, 0.01, 30),)
        assert acc.get_epsilon(delta=1e-5) == make_fresh_epsilon(self.name, 1.0, 0.01, 30)

    @pytest.mark.parametrize(
        "mutate, match",
        [
            (lambda s: "not a dict", "must be a dict"),
            (lambda s: {k: v for k, v in s.items() if k != "history"}, "needs the keys"),
            (lambda s: {**s, "format": 99}, "format must be 1"),
            (lambda s: {**s, "history": "x"}, "history must be a list"),
            (lambda s: {**s, "history": [[1.0, 0.01]]}, r"history\[0\] must be"),
            (lambda s: {**s, "history": [[-1.0, 0.01, 3]]}, r"history\[0\] is invalid: noise_multiplier"),
            (lambda s: {**s, "history": [[1.0, 2.0, 3]]}, r"history\[0\] is invalid: sample_rate"),
            (lambda s: {**s, "history": [[1.0, 0.01, 2.5]]}, r"history\[0\] is invalid: num_steps"),
        ],
    )
    def test_load_rejects_malformed_state(self, mutate, match):
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=3)
        state = acc.state_dict()
        before = acc.history
        with pytest.raises(CheckpointError, match=match):
            acc.load_state_dict(mutate(state))
        assert acc.history == before
        assert acc.get_epsilon(delta=1e-5) == make_fresh_epsilon(self.name, 1.0, 0.01, 3)

    def test_load_rejects_other_accountant_kind(self):
        other = next(n for n in ACCOUNTANTS if n != self.name)
        state = make_accountant(other).state_dict()
        with pytest.raises(CheckpointError, match=f"must come from a '{self.name}' accountant; got accountant='{other}'"):
            self.make().load_state_dict(state)

    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"noise_multiplier": -1.0, "sample_rate": 0.1}, ConfigError, "noise_multiplier must be finite and >= 0; got noise_multiplier=-1.0"),
            ({"noise_multiplier": math.inf, "sample_rate": 0.1}, ConfigError, "noise_multiplier must be finite"),
            ({"noise_multiplier": math.nan, "sample_rate": 0.1}, ConfigError, "noise_multiplier must be finite"),
            ({"noise_multiplier": "1", "sample_rate": 0.1}, ConfigTypeError, "noise_multiplier must be a real number"),
            ({"noise_multiplier": 1.0, "sample_rate": 0.0}, ConfigError, r"sample_rate must be in \(0, 1\]; got sample_rate=0.0"),
            ({"noise_multiplier": 1.0, "sample_rate": 1.5}, ConfigError, "sample_rate must be in"),
            ({"noise_multiplier": 1.0, "sample_rate": 0.1, "num_steps": -1}, ConfigError, "num_steps must be >= 0; got num_steps=-1"),
            ({"noise_multiplier": 1.0, "sample_rate": 0.1, "num_steps": 1.5}, ConfigTypeError, "num_steps must be an integer"),
        ],
    )
    def test_step_rejects_bad_input(self, kwargs, error, match):
        acc = self.make()
        with pytest.raises(error, match=match):
            acc.step(**kwargs)
        assert acc.steps == 0

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
    def test_get_epsilon_rejects_bad_delta(self, delta):
        with pytest.raises(ConfigError, match=r"delta must be in \(0, 1\); got delta="):
            self.make().get_epsilon(delta=delta)

    @pytest.mark.parametrize("epsilon", [-0.1, math.inf, math.nan])
    def test_get_delta_rejects_bad_epsilon(self, epsilon):
        with pytest.raises(ConfigError, match="epsilon must be finite and >= 0; got epsilon="):
            self.make().get_delta(epsilon=epsilon)


def make_fresh_epsilon(name, sigma, q, n, delta=1e-5):
    acc = make_accountant(name)
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    return acc.get_epsilon(delta=delta)


class TestRDPContract(AccountantContract):
    name = "rdp"


class TestPLDContract(AccountantContract):
    name = "pld"


def test_every_accountant_has_a_contract_test():
    tested = {cls.name for cls in AccountantContract.__subclasses__()}
    assert tested == set(ACCOUNTANTS)


def test_make_accountant_rejects_unknown_name():
    with pytest.raises(ConfigError, match=r"accountant must be one of 'pld', 'rdp'; got accountant='prv'. Pass one of"):
        make_accountant("prv")


def test_make_accountant_default_is_pld():
    assert isinstance(make_accountant(), PLDAccountant)
    assert isinstance(make_accountant("rdp"), RDPAccountant)


def test_accounting_never_imports_torch():
    code = (
        "import sys, privgrad.accounting, privgrad.accounting.events\n"
        "from privgrad.accounting import get_noise_multiplier\n"
        "get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.1, steps=10, accountant='rdp')\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
