"""Correlated noise through the engine (issue 22): ``make_private(..., mechanism=...)``.

Against independent references: the released noise whitened by the strategy ``C`` is white
N(0, 1) (so its covariance is ``sigma^2 C^2 C^{-1} C^{-T}``; plain DP-SGD noise fails it), epsilon
equals dp-accounting's for the reduced event, ``b = 1`` is DP-SGD bit for bit, the add-one
sensitivity of PRIVACY_TESTS.md row 4 holds under cyclic sampling, resume is exact, and the loops
and inputs that would break the participation pattern are refused before anything is released.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.errors import CheckpointError, ConfigError, ConfigTypeError, PrivacyStateError
from privgrad.mechanisms import BLT, DPSGD, BandMF
from privgrad.privatize.secure import lattice_spacing
from tests.privacy import checks

ALPHA = 1e-3
N, BATCH = 200, 10


def data(n: int = N, dim: int = 4):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, dim, generator=g), torch.randint(0, 2, (n,), generator=g),
                         torch.arange(n))


def attach(mechanism=None, *, sigma=1.0, seed=0, model=None, dataset=None, engine=None, **kw):
    torch.manual_seed(seed)
    model = model if model is not None else nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine or PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(dataset or data(), batch_size=BATCH),
                                   noise_multiplier=sigma, max_grad_norm=1.0, mechanism=mechanism,
                                   **kw)
    return model, optimizer, engine, dl


def train(model, optimizer, dl, steps: int, zero: bool = False) -> list:
    batches = []
    it = iter(dl)
    for _ in range(steps):
        try:
            x, y, idx = next(it)
        except StopIteration:
            it = iter(dl)
            x, y, idx = next(it)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        (loss * 0.0 if zero else loss).backward()
        optimizer.step()
        batches.append(idx.tolist())
    return batches


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_one_band_is_dp_sgd_bit_for_bit():
    runs = []
    for mechanism in (None, DPSGD(), BandMF(num_bands=1)):
        model, optimizer, engine, dl = attach(mechanism, epochs=1)
        batches = train(model, optimizer, dl, 15)
        runs.append((params(model), batches, engine.get_epsilon(1e-5), engine.accountant.history))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], other[0]))
        assert runs[0][1:] == other[1:]


def test_the_loader_samples_each_step_from_its_group():
    model, optimizer, engine, dl = attach(BandMF(num_bands=4), epochs=3)
    batches = train(model, optimizer, dl, 12)
    sampler = engine._sampler
    assert engine.settings.sample_rate == pytest.approx(BATCH * 4 / N)
    for t, batch in enumerate(batches):
        assert (sampler.group_of(batch) == t % 4).all(), (t, batch)
    last = {}
    for t, batch in enumerate(batches):  # a record comes back only b steps later or more
        for i in batch:
            assert t - last.get(i, -4) >= 4
            last[i] = t


def whitened(grads: np.ndarray, mechanism, n: int) -> np.ndarray:
    """``C w`` for the released noise ``w`` (steps x coordinates): white N(0, 1) exactly when
    ``w = C^{-1} z``."""
    strategy = mechanism.matrix(n).numpy()
    return strategy @ grads


@pytest.mark.parametrize("mechanism", [BandMF(num_bands=3), BLT(num_buffers=2, min_sep=3)],
                         ids=["bandmf", "blt"])
def test_the_released_noise_has_the_strategys_covariance(mechanism):
    """sigma = C = 1, summed loss, zero gradients: ``p.grad`` is the noise row ``w_t``. Per
    parameter (two layers, two parameter groups), ``C w`` must be white N(0, 1): chi-square
    variance, KS, mean and lag-1 tests of checks.assert_gaussian, and every pair of steps
    uncorrelated. The uncorrelated DP-SGD noise, whitened the same way, must fail."""
    n = 9
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 300), nn.Linear(300, 12))
    optimizer = torch.optim.SGD([{"params": model[0].parameters()},
                                 {"params": model[1].parameters(), "lr": 0.0}], lr=0.0)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=1.0, max_grad_norm=1.0, loss_reduction="sum",
                                   mechanism=mechanism, steps=n)
    grads = checks.zero_gradient_steps(model, optimizer, dl, n, engine)
    for name, w in grads.items():
        z = whitened(w, mechanism, n)
        checks.assert_gaussian(z.T, 1.0, f"{name} whitened")  # (coordinates x steps) rows
        corr = np.corrcoef(z)
        off = np.abs(corr[~np.eye(n, dtype=bool)]).max()
        assert off < 4.5 / math.sqrt(z.shape[1]), (name, off)
    # the mutant: independent noise is not what the strategy implies
    w = np.random.default_rng(0).standard_normal((n, 1200))
    z = whitened(w, mechanism, n)
    with pytest.raises(AssertionError):
        checks.assert_gaussian(z.T, 1.0, "dp-sgd noise whitened")
        corr = np.corrcoef(z)
        assert np.abs(corr[~np.eye(n, dtype=bool)]).max() < 4.5 / math.sqrt(z.shape[1])


def reference_epsilon(sigma: float, rate: float, count: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), count)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("mechanism,rate,count", [
    (BandMF(num_bands=4), BATCH * 4 / N, 4),          # 14 steps: ceil(14 / 4) rounds at p = q b
    (BLT(num_buffers=2, min_sep=5), 1.0, 1),          # one Gaussian mechanism, no amplification
], ids=["bandmf", "blt"])
def test_epsilon_is_dp_accountings_for_the_reduced_event(mechanism, rate, count):
    model, optimizer, engine, dl = attach(mechanism, sigma=1.3, steps=14)
    train(model, optimizer, dl, 14)
    assert engine.steps == 14
    got, want = engine.get_epsilon(1e-5), reference_epsilon(1.3, rate, count, 1e-5)
    assert abs(got - want) <= max(0.01, 0.01 * want), (got, want)
    (entry,) = engine.accountant.history
    assert (entry.sample_rate, entry.num_steps) == (pytest.approx(rate), count)


def test_calibration_meets_the_target_for_the_mechanism():
    model = nn.Linear(4, 2)
    engine = PrivacyEngine()
    torch.manual_seed(0)
    _, optimizer, dl = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data(), batch_size=BATCH), target_epsilon=3.0, target_delta=1e-5,
        max_grad_norm=1.0, epochs=2, mechanism=BandMF(num_bands=4))
    n = engine.settings.planned_steps
    assert n == 2 * 4 * round(1 / (BATCH * 4 / N))
    train(model, optimizer, dl, n)
    eps = engine.get_epsilon(1e-5)
    assert 2.97 <= eps <= 3.0, eps
    sigma = engine.settings.noise_multiplier
    ref = reference_epsilon(sigma, BATCH * 4 / N, math.ceil(n / 4), 1e-5)
    assert abs(eps - ref) <= 0.03
    assert reference_epsilon(sigma * 0.98, BATCH * 4 / N, math.ceil(n / 4), 1e-5) > 3.0


def test_resume_continues_the_noise_and_the_groups_exactly():
    mechanism = BandMF(num_bands=4)
    model, optimizer, engine, dl = attach(mechanism, steps=16)
    train(model, optimizer, dl, 6)
    saved = (engine.state_dict(), {k: v.clone() for k, v in model.state_dict().items()})
    rest = train(model, optimizer, dl, 6)
    expected, eps = params(model), engine.get_epsilon(1e-5)

    fresh = nn.Linear(4, 2)
    fresh.load_state_dict(saved[1])
    model2, optimizer2, engine2, dl2 = attach(mechanism, seed=99, model=fresh, steps=16)
    engine2.load_state_dict(saved[0])
    assert train(model2, optimizer2, dl2, 6) == rest
    assert all(torch.equal(a, b) for a, b in zip(expected, params(model2)))
    assert engine2.get_epsilon(1e-5) == eps


@pytest.mark.parametrize("other", [None, BandMF(num_bands=2), BandMF(num_bands=4, workload="momentum")])
def test_a_checkpoint_of_another_mechanism_is_refused(other):
    model, optimizer, engine, dl = attach(BandMF(num_bands=4), steps=16)
    train(model, optimizer, dl, 2)
    state = engine.state_dict()
    _, _, engine2, _ = attach(other, steps=16)
    with pytest.raises(CheckpointError, match="same"):
        engine2.load_state_dict(state)
    assert engine2.steps == 0 and not engine2.accountant.history


def test_a_step_beyond_the_planned_steps_is_refused():
    model, optimizer, engine, dl = attach(BandMF(num_bands=2), steps=5)
    train(model, optimizer, dl, 5)
    before, eps = params(model), engine.get_epsilon(1e-5)
    with pytest.raises(PrivacyStateError, match="planned for 5 steps"):
        train(model, optimizer, dl, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))
    assert engine.get_epsilon(1e-5) == eps and engine.steps == 5


def test_a_skipped_batch_is_refused_and_nothing_is_released():
    model, optimizer, engine, dl = attach(BandMF(num_bands=4), steps=40, seed=5)
    it = iter(dl)
    x, y, _ = next(it)  # drawn, never stepped
    x2, y2, _ = next(it)
    assert len(x) != len(x2)  # (this seed: a skip the engine can see)
    before = params(model)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x2), y2).backward()
    with pytest.raises(PrivacyStateError, match="every drawn batch stepped"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))
    assert engine.steps == 0 and not engine.accountant.history


def test_rows_of_batches_left_undrawn_by_a_loop_broken_off_are_skipped():
    """A loop that leaves an epoch early drops nothing pending; the next epoch's batch uses the
    noise row of its own sampler step, and the accountant counts every round a release touched
    (a round whose batches were all dropped released nothing of anyone)."""
    model, optimizer, engine, dl = attach(BandMF(num_bands=4), steps=60)
    it = iter(dl)
    for _ in range(3):
        x, y, _ = next(it)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    engine._sampler.step += 5  # five samples drawn ahead (a prefetching worker) and dropped
    del it
    train(model, optimizer, dl, 2)
    assert engine._mechanism_run.noise.row == engine._sampler.step == 10
    assert engine.accountant.history[0].num_steps == 2  # rounds 0 (steps 0-2) and 2 (8, 9)


def test_virtual_batches_add_the_correlated_noise_once_per_logical_step():
    results = []
    for physical in (None, 3):
        model, optimizer, engine, dl = attach(BandMF(num_bands=2), steps=8, seed=2)
        if physical is None:
            train(model, optimizer, dl, 8)
        else:
            with engine.virtual_batches(dl, max_physical_batch_size=physical) as chunks:
                for x, y, _ in chunks:
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
                    optimizer.step()
                    if engine.steps == 8 and engine._release_now:
                        break
        results.append((params(model), engine.steps, engine.accountant.history))
    (big, steps_big, acc_big), (virtual, steps_virtual, acc_virtual) = results
    assert steps_big == steps_virtual == 8 and acc_big == acc_virtual
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(big, virtual))


@pytest.mark.parametrize("mode", ["auto", "materialize"])
def test_adding_one_record_moves_each_release_by_at_most_c(mode):
    """PRIVACY_TESTS.md row 4 under cyclic sampling: D and D + x with the same seeds and groups;
    sigma = 0."""
    checks.check_add_one_sensitivity(checks.CASES[0], mode, mechanism=BandMF(num_bands=2),
                                     steps=25)


def test_phases_compose_in_the_accountant():
    engine = PrivacyEngine()
    model, optimizer, engine, dl = attach(None, sigma=1.2, engine=engine)
    train(model, optimizer, dl, 3)
    engine.detach()
    model, optimizer, engine, dl = attach(BandMF(num_bands=2), sigma=1.5, engine=engine, steps=4)
    train(model, optimizer, dl, 4)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(BATCH / N, dp_accounting.GaussianDpEvent(1.2)), 3))
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(2 * BATCH / N, dp_accounting.GaussianDpEvent(1.5)), 2))
    want = acc.get_epsilon(1e-5)
    assert abs(engine.get_epsilon(1e-5) - want) <= max(0.01, 0.01 * want)


def test_adaptive_clipping_with_correlated_noise_costs_the_same_epsilon():
    eps = []
    for clipping in ("flat", "adaptive"):
        model, optimizer, engine, dl = attach(BandMF(num_bands=2), steps=6, clipping=clipping)
        train(model, optimizer, dl, 6)
        eps.append(engine.get_epsilon(1e-5))
    assert eps[0] == eps[1]


def test_secure_mode_draws_lattice_releases_that_differ_between_runs():
    pytest.importorskip("cryptography")
    runs = []
    for _ in range(2):
        model, optimizer, engine, dl = attach(BandMF(num_bands=2), steps=4, loss_reduction="sum",
                                              engine=PrivacyEngine(secure_mode=True))
        train(model, optimizer, dl, 1)
        runs.append(params(model))
        spacing = lattice_spacing(engine.settings.noise_std)
        grad = model.weight.grad.double() / spacing
        assert torch.equal(grad, grad.round())
    assert not torch.equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(mechanism=BandMF(num_bands=4)), ConfigError,
     r"plans its noise for the run's length, so steps or epochs must be given"),
    (dict(mechanism=BandMF(num_bands=4), steps=3), ConfigError,
     r"num_bands must be <= the number of steps \(3\); got num_bands=4"),
    (dict(mechanism=BandMF(num_bands=30), steps=100), ConfigError,
     r"sample_rate \* num_groups = 1\.5 must be <= 1; got num_groups=30\. Pass num_bands"),
    (dict(mechanism=BLT(num_buffers=2), epochs=1), ConfigError,
     r"BLT\(min_sep=None\) lets each record take part once.*; got epochs=1"),
    (dict(mechanism=BLT(num_buffers=2, min_sep=15), steps=10), ConfigError,
     r"min_sep must be <= the number of steps \(10\); got min_sep=15"),
    (dict(mechanism="bandmf", steps=10), ConfigTypeError, r"mechanism must be privgrad"),
    (dict(mechanism=BandMF(num_bands=2), steps=10, epochs=1), ConfigError,
     r"at most one of steps and epochs"),
    (dict(mechanism=BandMF(num_bands=2), steps=10, poisson_sampling=False), ConfigError,
     r"needs privgrad's cyclic Poisson sampling; got poisson_sampling=False"),
])
def test_bad_input_is_refused_before_anything_is_attached(kwargs, error, message):
    model = nn.Linear(4, 2)
    engine = PrivacyEngine()
    with pytest.raises(error, match=message):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=DataLoader(data(), batch_size=BATCH),
                            noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)
    assert engine.module is None


def test_a_second_phase_on_the_returned_loader_keeps_the_data_sets_rate():
    """The loader a BandMF phase returned samples at p = q b; a phase after it on that loader
    starts again from q (not from p, which would multiply the rate by b twice)."""
    model, optimizer, engine, dl = attach(BandMF(num_bands=4), steps=8)
    train(model, optimizer, dl, 8)
    engine.detach()
    for mechanism, rate in ((None, BATCH / N), (BandMF(num_bands=2), 2 * BATCH / N)):
        again = PrivacyEngine()
        again.make_private(module=model, optimizer=optimizer, data_loader=dl,
                           noise_multiplier=1.0, max_grad_norm=1.0, mechanism=mechanism, steps=8)
        assert again.settings.sample_rate == pytest.approx(rate)
        assert again.settings.expected_batch_size == BATCH
        again.detach()


def test_a_parameter_unfrozen_after_make_private_is_refused_before_any_release():
    """Its clipped sum would leave without correlated noise (it has no generator); nothing is
    released, nothing spent, no gradient written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=1.0, max_grad_norm=1.0,
                                   mechanism=BandMF(num_bands=2), steps=10)
    train(model, optimizer, dl, 2)
    model[0].requires_grad_(True)  # gradual unfreezing
    before, eps = params(model), engine.get_epsilon(1e-5)
    with pytest.raises(PrivacyStateError, match=r"0.weight, 0.bias trainable after it"):
        train(model, optimizer, dl, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))
    assert engine.get_epsilon(1e-5) == eps and engine.steps == 2
    assert all(p.grad is None for p in model.parameters())
