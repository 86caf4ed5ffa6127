"""``privgrad.opacus.PrivacyEngine``: Opacus's calls and return values over privgrad's engine,
the optimizer view, ``BatchMemoryManager``, checkpoints, and every Opacus keyword privgrad
refuses (each with its fix). One equivalence test runs Opacus itself on the same batch."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import privgrad
import privgrad.opacus as opacus
from privgrad.errors import ConfigError, PrivacyStateError
from privgrad.opacus.optimizers import DPOptimizer, PrivateOptimizer


def setup(n=64, batch=16, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = TensorDataset(torch.randn(n, 6), torch.randint(0, 3, (n,)))
    engine = opacus.PrivacyEngine(**kwargs)
    return engine, model, optimizer, DataLoader(data, batch_size=batch)


def private(noise_multiplier=1.0, max_grad_norm=1.0, **kwargs):
    engine, model, optimizer, loader = setup()
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                              noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                              **kwargs)
    return engine, model, optimizer, out


def step(model, optimizer, batch):
    x, y = batch
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


# -- what make_private returns ------------------------------------------------------------------
def test_three_values_the_model_itself_and_a_view_of_the_optimizer():
    engine, model, original, out = private()
    m, optimizer, loader = out
    assert m is model and engine.privgrad_engine.module is model
    assert isinstance(optimizer, PrivateOptimizer) and isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.original_optimizer is original
    assert optimizer.param_groups is original.param_groups and optimizer.state is original.state
    assert (optimizer.noise_multiplier, optimizer.max_grad_norm) == (1.0, 1.0)
    assert optimizer.expected_batch_size == 16 and optimizer.loss_reduction == "mean"
    step(m, optimizer, next(iter(loader)))
    assert engine.privgrad_engine.steps == 1 and len(engine.accountant) == 1


def test_ghost_mode_returns_four_values_with_the_users_criterion():
    criterion = nn.CrossEntropyLoss()
    engine, model, _, out = private(criterion=criterion, grad_sample_mode="ghost")
    m, optimizer, crit, loader = out
    assert crit is criterion and m is model
    x, y = next(iter(loader))
    optimizer.zero_grad()
    crit(m(x), y).backward()
    optimizer.step()
    assert engine.privgrad_engine.steps == 1


def test_ghost_mode_without_a_criterion_gets_opacus_default():
    *_, (_, _, crit, _) = private(grad_sample_mode="ghost")
    assert isinstance(crit, nn.CrossEntropyLoss) and crit.reduction == "mean"


def test_the_optimizer_views_privacy_settings_are_read_only():
    _, _, _, (_, optimizer, _) = private()
    with pytest.raises(PrivacyStateError, match=r"got optimizer.noise_multiplier=2.0\. Start a"):
        optimizer.noise_multiplier = 2.0
    assert optimizer.noise_multiplier == 1.0
    optimizer.custom = 3  # other attributes are the view's own, as on any object
    assert optimizer.custom == 3


@pytest.mark.parametrize("on", ["view", "original"])
def test_a_scheduler_on_either_object_drives_the_same_learning_rate(on):
    _, model, original, (_, optimizer, loader) = private()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer if on == "view" else original, 1, 0.5)
    for batch in loader:
        step(model, optimizer, batch)
        scheduler.step()
    assert original.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5 ** 4)


def test_a_step_without_backward_is_refused_through_the_view():
    _, _, _, (_, optimizer, _) = private()
    with pytest.raises(PrivacyStateError, match="must follow a backward pass"):
        optimizer.step()


def test_optimizer_state_dict_round_trips_through_the_view():
    _, model, original, (_, optimizer, loader) = private()
    step(model, optimizer, next(iter(loader)))
    assert optimizer.state_dict() == original.state_dict()
    optimizer.load_state_dict(optimizer.state_dict())


def test_per_layer_bounds_and_data_parallel_attributes():
    bounds = [0.5] * 4
    _, _, _, (_, optimizer, _) = private(max_grad_norm=bounds, clipping="per_layer")
    assert optimizer.max_grad_norm == bounds and optimizer.expected_batch_size == 16


# -- the normaliser and the clipping are Opacus's ------------------------------------------------
def test_one_step_equals_opacus_on_the_same_batch_without_noise():
    opacus_engine = pytest.importorskip("opacus").PrivacyEngine
    engine, model, optimizer, loader = setup()
    reference = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=0.1)
    batch = next(b for b in loader if len(b[0]) != 16)  # its size is not the expected 16
    step(model, optimizer, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's own warnings (secure RNG off, ...)
        theirs = opacus_engine(accountant="rdp")
        ref_model, ref_optimizer, _ = theirs.make_private(
            module=reference, optimizer=torch.optim.SGD(reference.parameters(), lr=0.5),
            data_loader=DataLoader(loader.dataset, batch_size=16), noise_multiplier=0.0,
            max_grad_norm=0.1)
        step(ref_model, ref_optimizer, batch)
    assert ref_optimizer.expected_batch_size == 16
    for ours, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# -- BatchMemoryManager --------------------------------------------------------------------------
def test_batch_memory_manager_splits_batches_and_steps_once_per_logical_batch():
    engine, model, _, (_, optimizer, loader) = private()
    sizes = []
    with opacus.BatchMemoryManager(data_loader=loader, max_physical_batch_size=5,
                                   optimizer=optimizer) as physical:
        for batch in physical:
            sizes.append(len(batch[0]))
            step(model, optimizer, batch)
    assert max(sizes) <= 5 and len(sizes) > 4
    assert engine.privgrad_engine.steps == 4 and engine.accountant.history == [(1.0, 0.25, 4)]


def test_batch_memory_manager_needs_the_returned_optimizer():
    _, _, original, (_, _, loader) = private()
    with pytest.raises(ConfigError, match=r"got optimizer='SGD'\. Pass the optimizer"):
        opacus.BatchMemoryManager(data_loader=loader, max_physical_batch_size=4,
                                  optimizer=original)


# -- Opacus keywords privgrad refuses, each with its fix ---------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"batch_first": False}, r"batch-first models only.*got batch_first=False\. Give the model"),
    ({"noise_generator": torch.Generator()}, r"got noise_generator='Generator'\. Drop"),
    ({"rand_on_empty": True}, r"got rand_on_empty=True\. Drop rand_on_empty"),
    ({"grad_sample_mode": "no_op"}, r"got grad_sample_mode='no_op'\. Drop"),
    ({"wrap_model": "yes"}, r"got wrap_model='yes'\. Drop it"),
    ({"target_unclipped_quantile": 0.5}, r"got keywords=\['target_unclipped_quantile'\]"),
    ({"grad_sample_mode": "ghost", "criterion": nn.CrossEntropyLoss(reduction="sum")},
     r"criterion.reduction must match loss_reduction='mean'; got criterion.reduction='sum'"),
])
def test_opacus_keywords_privgrad_cannot_honour_are_refused(kwargs, match):
    engine, model, optimizer, loader = setup()
    with pytest.raises(ConfigError, match=match):
        engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                            noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)
    assert engine.privgrad_engine.module is None  # nothing attached


def test_wrap_model_false_and_privgrads_own_keywords_pass():
    engine, model, optimizer, loader = setup(n=50)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, wrap_model=False, sample_rate=0.2, expected_batch_size=10.0)
    assert optimizer.expected_batch_size == 10.0
    assert engine.privgrad_engine.settings.sample_rate == 0.2


@pytest.mark.parametrize("which", ["module", "optimizer"])
def test_hand_assembled_pieces_are_not_taken_by_make_private(which):
    engine, model, optimizer, loader = setup()
    given = dict(module=model, optimizer=optimizer)
    given[which] = (opacus.GradSampleModule(model) if which == "module" else DPOptimizer(
        optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=16))
    with pytest.raises(ConfigError, match="make_private takes the .* itself"):
        engine.make_private(data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, **given)


def test_make_private_with_epsilon_meets_the_target_and_accepts_opacus_search_keywords():
    engine, model, optimizer, loader = setup()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=3.0,
        target_delta=1e-3, epochs=2, max_grad_norm=1.0, epsilon_tolerance=0.01)
    for _ in range(2):
        for batch in loader:
            step(model, optimizer, batch)
    assert engine.privgrad_engine.steps == 8
    assert 2.9 < engine.get_epsilon(1e-3) <= 3.0


def test_make_private_with_epsilon_passes_privgrads_keywords_and_refuses_opacus_ones():
    engine, model, optimizer, loader = setup()
    _, optimizer, _ = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=3.0,
        target_delta=1e-3, steps=10, max_grad_norm=1.0, sample_rate=0.2,
        expected_batch_size=12.0, check="every_step")
    assert optimizer.expected_batch_size == 12.0 and engine.privgrad_engine.check == "every_step"
    engine, model, optimizer, loader = setup()
    with pytest.raises(ConfigError, match=r"got rand_on_empty=True"):
        engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=3.0,
            target_delta=1e-3, epochs=1, max_grad_norm=1.0, rand_on_empty=True)


def test_is_compatible_validate_and_get_compatible_module():
    engine, *_ = setup()
    bad = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert not engine.is_compatible(module=bad, optimizer=None, data_loader=None)
    with pytest.raises(privgrad.errors.ModelValidationError, match="BatchNorm"):
        engine.validate(module=bad, optimizer=None, data_loader=None)
    fixed = opacus.PrivacyEngine.get_compatible_module(bad)
    assert engine.is_compatible(module=fixed) and isinstance(bad[1], nn.BatchNorm1d)


# -- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_dict_round_trips_and_the_run_resumes(tmp_path):
    engine, model, _, (_, optimizer, loader) = private()
    for batch in loader:
        step(model, optimizer, batch)
    engine.save_checkpoint(path=tmp_path / "run.pt", module=model, optimizer=optimizer,
                           checkpoint_dict={"epoch": 1, "note": "opacus keys"})
    resumed, model2, _, (_, optimizer2, _) = private()
    extra = resumed.load_checkpoint(path=tmp_path / "run.pt", module=model2,
                                    optimizer=optimizer2)
    assert extra == {"epoch": 1, "note": "opacus keys"}
    assert resumed.accountant.history == engine.accountant.history == [(1.0, 0.25, 4)]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_checkpoint_schedulers_are_refused(tmp_path):
    engine, model, _, (_, optimizer, _) = private()
    with pytest.raises(ConfigError, match=r"got keywords=\['noise_scheduler'\]"):
        engine.save_checkpoint(path=tmp_path / "x.pt", module=model, optimizer=optimizer,
                               noise_scheduler=object())


def test_opacus_adaptive_clipping_keywords_map_to_privgrads():
    """AdaClipDPOptimizer's keywords: the quantile, the bound's step and the count's noise carry
    over; the clamps, which privgrad's bound does not have, are named in a warning."""
    with pytest.warns(UserWarning, match=r"not clamped; got \{'max_clipbound': 10.0, 'min_clipbound': 0.01\}"):
        engine, model, _, (m, optimizer, loader) = private(
            clipping="adaptive", target_unclipped_quantile=0.7, clipbound_learning_rate=0.3,
            unclipped_num_std=2.0, max_clipbound=10.0, min_clipbound=0.01)
    adaptive = engine.privgrad_engine.adaptive_clipping
    assert (adaptive.target_quantile, adaptive.lr, adaptive.count_noise_std) == (0.7, 0.3, 2.0)
    step(m, optimizer, next(iter(loader)))
    assert len(adaptive.bounds) == 1 and engine.privgrad_engine.steps == 1
