"""Releases before training (``PrivacyEngine.release_sum``) and a budget that counts them.

The hole this closes: ``make_private_with_epsilon`` calibrated training's noise for the whole
``target_epsilon`` even when the engine's accountant already held a release, so the run ended
above its target (4.4 spent + training = 5.3 reported for a target of 3). Every test here
checks a number against an independent reference: a per-row loop, dp_accounting's own
mechanism, the accountant run to the end of training.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from torch import nn

from privgrad import PrivacyEngine
from privgrad.accounting import get_noise_multiplier, make_accountant
from privgrad.accounting.events import Composed, PoissonGaussian, Repeated
from privgrad.errors import CheckpointError, ConfigError, ConfigTypeError, PrivacyBudgetError, PrivacyStateError
from privgrad.mechanisms import BandMF
from privgrad.privatize.statistics import noisy_sum
from tests.helpers import classification_data, loader, mlp


class Exact:
    """A noise source that adds nothing: the clipped sum itself, to check against a loop."""

    secure, fuses_sums = False, False

    def add_noise(self, total, std):
        self.std = std
        return total.clone()

    def sample_many(self, likes, std):
        return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in likes]

    def seeded(self, seed):
        return self

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def loop_reference(rows, bound):
    out = torch.zeros(rows.shape[1], dtype=torch.float64)
    for r in rows.double():
        out += r * min(1.0, bound / float(r.norm())) if float(r.norm()) > 0 else r
    return out


def epochs_of(engine, model, optimizer, data, epochs):
    for _ in range(epochs):
        for x, y in data:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


# -- the release -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_row_is_clipped_to_the_bound_as_in_a_per_row_loop(dtype):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 7, generator=g, dtype=dtype) * torch.logspace(-2, 3, 50, dtype=dtype)[:, None]
    rows[3] = 0  # a zero row contributes nothing, not NaN
    source = Exact()
    out = noisy_sum(rows, max_norm=1.5, noise_multiplier=2.0, noise=source)
    assert out.dtype == dtype and source.std == 3.0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), loop_reference(rows, 1.5), rtol=tol, atol=tol)


def test_one_example_moves_the_sum_by_at_most_the_bound():
    """Sensitivity against an attacker's row, through the engine: however large, adding it
    moves the released sum by at most C (the noise source adds nothing here)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, 5, generator=g)
    engine = PrivacyEngine(noise=Exact())
    for attacker in (torch.full((1, 5), 1e30), torch.tensor([[1e-30, 0, 0, 0, 0]]), -base[:1] * 1e6):
        with_it = engine.release_sum(torch.cat([base, attacker]), max_norm=0.7, noise_multiplier=1.0)
        without = engine.release_sum(base, max_norm=0.7, noise_multiplier=1.0)
        assert float((with_it - without).norm()) <= 0.7 * (1 + 1e-6)
        assert float((with_it - without).norm()) > 0.7 * (1 - 1e-6) or attacker.norm() < 0.7


def test_half_precision_rows_are_summed_in_float32():
    rows = torch.full((4096, 2), 1.0, dtype=torch.float16)  # the float16 sum stops at 2048
    out = noisy_sum(rows, max_norm=2.0, noise_multiplier=1.0, noise=Exact())
    assert out.dtype == torch.float32 and out.tolist() == [4096.0, 4096.0]


@pytest.mark.slow
def test_the_noise_has_the_stated_standard_deviation():
    """Many releases of the same rows: the spread is sigma * C per coordinate (chi-square)."""
    engine = PrivacyEngine()
    torch.manual_seed(0)
    rows = torch.randn(30, 4)
    clean = noisy_sum(rows, max_norm=0.5, noise_multiplier=3.0, noise=Exact())
    draws = torch.stack([engine.release_sum(rows, max_norm=0.5, noise_multiplier=3.0)
                         for _ in range(2000)]) - clean
    z = draws / 1.5  # standard normal if the std is 3 * 0.5
    n = z.numel()  # chi-square with n degrees of freedom: mean n, sd sqrt(2n); 5 sd either way
    assert abs(float((z ** 2).sum()) - n) < 5 * math.sqrt(2 * n)
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert engine.accountant.steps == 2000  # each release paid for


def test_the_release_is_recorded_as_the_gaussian_mechanism():
    engine = PrivacyEngine(accountant="pld")
    engine.release_sum(torch.ones(10, 3), max_norm=1.0, noise_multiplier=2.5)
    assert engine.accountant.history == ((2.5, 1.0, 1),)
    # dp_accounting's own Gaussian mechanism (no subsampling), independently
    ref = dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(2.5))
    assert engine.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-3)


@pytest.mark.parametrize("rows, kwargs, error, match", [
    ([[1.0, 2.0]], {}, ConfigTypeError, "rows must be a floating-point tensor of shape"),
    (torch.ones(3, dtype=torch.int64).reshape(3, 1), {}, ConfigTypeError, r"torch.int64\(3, 1\)"),
    (torch.ones(3), {}, ConfigTypeError, r"got rows=torch.float32\(3,\)"),
    (torch.tensor([[1.0], [math.nan]]), {}, ConfigError, r"rows must be finite; got 1 row\(s\)"),
    (torch.ones(2, 2), {"max_norm": 0.0}, ConfigError, "max_norm must be > 0"),
    (torch.ones(2, 2), {"max_norm": math.inf}, ConfigError, "max_norm must be > 0 and finite"),
    (torch.ones(2, 2), {"noise_multiplier": 0.0}, ConfigError, "not private"),
])
def test_bad_input_is_refused_and_nothing_is_recorded(rows, kwargs, error, match):
    engine = PrivacyEngine()
    with pytest.raises(error, match=match):
        engine.release_sum(rows, **{"max_norm": 1.0, "noise_multiplier": 1.0, **kwargs})
    assert engine.accountant.steps == 0


def test_a_release_while_training_is_refused():
    engine = PrivacyEngine()
    model = mlp()
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        data_loader=loader(classification_data()), noise_multiplier=1.0,
                        max_grad_norm=1.0)
    with pytest.raises(PrivacyStateError, match="release_sum must come before make_private"):
        engine.release_sum(torch.ones(3, 2), max_norm=1.0, noise_multiplier=1.0)
    assert engine.accountant.steps == 0


# -- the budget counts what was spent ---------------------------------------------------------
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibration_after_a_prior_keeps_the_total_within_target(accountant):
    prior = Composed((PoissonGaussian(4.0, 1.0), Repeated(PoissonGaussian(1.0, 0.01), 300)))
    kw = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.02, steps=500, accountant=accountant)
    alone, after = get_noise_multiplier(**kw), get_noise_multiplier(**kw, prior=prior)
    assert after > alone  # less budget left, more noise

    def total(sigma):
        acc = make_accountant(accountant)
        acc.compose(prior)
        acc.step(noise_multiplier=sigma, sample_rate=0.02, num_steps=500)
        return acc.get_epsilon(1e-5)

    assert total(after) <= 3.0 < total(after / 1.005)  # within budget, and tight


def test_a_prior_that_spends_the_budget_is_refused():
    with pytest.raises(PrivacyBudgetError, match=r"target_epsilon must be larger than what was "
                       r"already spent; got target_epsilon=1.0 with epsilon=\d"):
        get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=10,
                             prior=PoissonGaussian(1.0, 1.0))
    with pytest.raises(ConfigTypeError, match="prior must be a PoissonGaussian"):
        get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=10,
                             prior=(1.0, 1.0))


@pytest.mark.parametrize("mechanism", [None, BandMF(num_bands=2)], ids=["dpsgd", "bandmf"])
def test_training_after_a_release_ends_at_the_target_not_above(mechanism):
    """The whole run, released statistics and every planned step, reports <= target_epsilon."""
    torch.manual_seed(0)
    engine = PrivacyEngine(accountant="pld")
    data = classification_data(n=200)
    engine.release_sum(data.tensors[0], max_norm=1.0, noise_multiplier=1.0)
    spent = engine.get_epsilon(1e-5)
    model = mlp()
    extra = {} if mechanism is None else {"mechanism": mechanism}
    model, optimizer, train = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(data, batch_size=20), target_epsilon=6.0, target_delta=1e-5,
        epochs=2, max_grad_norm=1.0, **extra)
    epochs_of(engine, model, optimizer, train, 2)
    assert 2.0 < spent and engine.get_epsilon(1e-5) <= 6.0
    assert engine.get_epsilon(1e-5) > 5.8  # the rest of the budget was spent, not wasted


def test_a_budget_the_release_already_spent_attaches_nothing():
    engine = PrivacyEngine()
    engine.release_sum(torch.ones(5, 2), max_norm=1.0, noise_multiplier=0.5)
    model = mlp()
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(classification_data()), target_epsilon=3.0, target_delta=1e-5,
            epochs=1, max_grad_norm=1.0)
    assert engine.module is None and not model._forward_hooks and engine.accountant.steps == 1


def _run(release: bool, state=None):
    torch.manual_seed(0)
    engine = PrivacyEngine()
    data = classification_data(n=200)
    if release:
        engine.release_sum(data.tensors[0], max_norm=1.0, noise_multiplier=1.0)
    model = mlp()
    model, optimizer, train = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(data, batch_size=20), target_epsilon=6.0, target_delta=1e-5,
        epochs=2, max_grad_norm=1.0)
    if state is not None:
        engine.load_state_dict(state)
    return engine, model, optimizer, train


def test_a_resumed_run_counts_the_release_once_and_needs_it_again():
    engine, model, optimizer, train = _run(release=True)
    epochs_of(engine, model, optimizer, train, 1)
    state, history = engine.state_dict(), engine.accountant.history
    resumed = _run(release=True, state=state)[0]
    assert resumed.accountant.history == history  # the saved history, not release + history
    with pytest.raises(CheckpointError, match="noise_multiplier"):
        _run(release=False, state=state)  # a resume that forgot the release is louder than wrong


def test_a_resume_with_another_release_is_refused():
    """With a fixed noise multiplier the settings agree; the accountant's prefix must too."""
    def run(release_sigma, state=None):
        torch.manual_seed(0)
        engine = PrivacyEngine()
        engine.release_sum(torch.ones(8, 2), max_norm=1.0, noise_multiplier=release_sigma)
        model = mlp()
        model, optimizer, train = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(classification_data(n=100), batch_size=20), noise_multiplier=1.0,
            max_grad_norm=1.0)
        if state is not None:
            engine.load_state_dict(state)
        return engine, model, optimizer, train

    engine, model, optimizer, train = run(5.0)
    epochs_of(engine, model, optimizer, train, 1)
    state = engine.state_dict()
    assert run(5.0, state)[0].accountant.history == engine.accountant.history
    with pytest.raises(CheckpointError, match=r"same accountant history before training"):
        run(6.0, state)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_the_steps_a_budget_allows_count_the_prior(accountant):
    from privgrad.accounting import get_max_epochs, get_max_steps

    prior = PoissonGaussian(3.0, 1.0)
    kw = dict(target_epsilon=3.0, target_delta=1e-5, noise_multiplier=1.0, sample_rate=0.01,
              accountant=accountant)
    alone, after = get_max_steps(**kw), get_max_steps(**kw, prior=prior)
    assert 0 < after < alone

    def total(steps):
        acc = make_accountant(accountant)
        acc.compose(prior)
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=steps)
        return acc.get_epsilon(1e-5)

    assert total(after) <= 3.0 < total(after + 1)
    assert get_max_epochs(**kw, prior=prior) == pytest.approx(after * 0.01)


# -- user level -------------------------------------------------------------------------------
def test_a_user_level_release_clips_each_users_sum():
    """Five near-identical rows of one user move the release by C, not 5 C."""
    engine = PrivacyEngine(noise=Exact())
    others = torch.randn(10, 3, generator=torch.Generator().manual_seed(2)) * 0.1
    user = torch.tensor([[1.0, 0.0, 0.0]]).repeat(5, 1)
    ids = list(range(10)) + ["u"] * 5
    with_user = engine.release_sum(torch.cat([others, user]), max_norm=1.0, noise_multiplier=1.0,
                                   user_ids=ids)
    without = engine.release_sum(others, max_norm=1.0, noise_multiplier=1.0,
                                 user_ids=list(range(10)))
    torch.testing.assert_close(with_user - without, torch.tensor([1.0, 0.0, 0.0]))
    per_row = engine.release_sum(torch.cat([others, user]), max_norm=1.0, noise_multiplier=1.0)
    torch.testing.assert_close(per_row - without, torch.tensor([5.0, 0.0, 0.0]))  # example level


def _attach(engine, unit):
    model = mlp()
    data = classification_data(n=40)
    users = {"privacy_unit": "user", "user_ids": [i % 10 for i in range(40)],
             "max_examples_per_user": 4} if unit == "user" else {}
    return engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=loader(data), noise_multiplier=1.0, max_grad_norm=1.0,
                               **users)


@pytest.mark.parametrize("released, run", [("example", "user"), ("user", "example")])
def test_a_run_must_protect_the_unit_its_releases_protected(released, run):
    engine = PrivacyEngine()
    ids = {"user_ids": [0, 0, 1]} if released == "user" else {}
    engine.release_sum(torch.ones(3, 2), max_norm=1.0, noise_multiplier=4.0, **ids)
    try:  # (an AssertionError when nothing is raised: tests/privacy/test_mutants.py)
        _attach(engine, run)
    except PrivacyStateError as e:
        assert f"got a release at the {released} level and privacy_unit='{run}'" in str(e)
    else:
        raise AssertionError(f"a {run}-level run was attached after a {released}-level release")
    assert engine.module is None
    _attach(_released(released), released)  # the same unit is fine


def _released(unit):
    engine = PrivacyEngine()
    ids = {"user_ids": [0, 0, 1]} if unit == "user" else {}
    engine.release_sum(torch.ones(3, 2), max_norm=1.0, noise_multiplier=4.0, **ids)
    return engine


def test_user_ids_of_the_wrong_length_release_nothing():
    engine = PrivacyEngine()
    with pytest.raises(ConfigError, match=r"user_ids must have one id per example"):
        engine.release_sum(torch.ones(3, 2), max_norm=1.0, noise_multiplier=1.0, user_ids=[0, 1])
    assert engine.accountant.steps == 0


def test_a_release_in_a_distributed_job_is_refused(tmp_path):
    """Each rank would release its own noisy copy of the statistics while each accountant
    records one release: refused, with the way to do it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        engine = PrivacyEngine()
        with pytest.raises(PrivacyStateError, match="release_sum runs in one process"):
            engine.release_sum(torch.ones(3, 2), max_norm=1.0, noise_multiplier=1.0)
        assert engine.accountant.steps == 0
    finally:
        dist.destroy_process_group()


def test_a_second_phase_on_the_same_engine_gets_what_is_left():
    """Detach, then make private again (e.g. more layers unfrozen): the second calibration
    counts the first phase, so the run ends at the total target, not at twice it."""
    torch.manual_seed(0)
    engine = PrivacyEngine()
    data = classification_data(n=200)

    def phase(target):
        model = mlp()
        model, optimizer, train = engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(data, batch_size=20), target_epsilon=target, target_delta=1e-5,
            epochs=1, max_grad_norm=1.0)
        epochs_of(engine, model, optimizer, train, 1)
        engine.detach()

    phase(2.0)
    first = engine.get_epsilon(1e-5)
    assert 1.9 < first <= 2.0
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        phase(first)  # a target the first phase used up: nothing left
    assert engine.module is None and engine.get_epsilon(1e-5) == first
    phase(4.0)
    assert 3.9 < engine.get_epsilon(1e-5) <= 4.0
