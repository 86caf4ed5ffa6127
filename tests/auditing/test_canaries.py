"""Gradient canaries through privgrad's real engine: exact contribution C, inclusion as sampled,
the user's model untouched, and refusals of what the audit cannot describe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.auditing import CanaryBatch, GradientCanaries
from privgrad.errors import ConfigError, PrivacyStateError
from tests.helpers import drawn

N, FEATURES, CLASSES = 60, 5, 3


def records(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def private_run(canaries: GradientCanaries, *, noise_multiplier=1e-4, max_grad_norm=0.5,
                sample_rate=0.3, loss_reduction="mean", clipping="flat", watch=True):
    model = nn.Linear(FEATURES, CLASSES)
    module = canaries.module_with(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    data = canaries.dataset(records())
    loader = DataLoader(data, batch_size=10, collate_fn=data.collate)
    engine = PrivacyEngine()
    module, optimizer, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, sample_rate=sample_rate, clipping=clipping,
        expected_batch_size=sample_rate * len(data), loss_reduction=loss_reduction)
    if watch:
        canaries.watch(engine, optimizer)
    return engine, module, optimizer, loader, model


def train(engine, module, optimizer, loader, canaries, steps: int):
    while engine.steps < steps:
        for (x, y), ids in loader:
            optimizer.zero_grad()
            canaries.loss(F.cross_entropy(module(x), y, reduction="none"), ids).backward()
            optimizer.step()
            if engine.steps >= steps:
                break


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_sampled_canary_adds_exactly_c(reduction):
    canaries = GradientCanaries(40, seed=1)
    run = private_run(canaries, loss_reduction=reduction)
    train(*run[:4], canaries, steps=12)
    obs = canaries.observations()
    assert obs.released.shape == (12, 40) and obs.steps == run[0].steps
    c = 0.5
    assert obs.sampled.any()
    np.testing.assert_allclose(obs.released[obs.sampled], c, atol=1e-3 * c)
    assert np.abs(obs.released[~obs.sampled]).max() < 1e-3 * c
    assert not obs.sampled[:, ~obs.included].any()  # excluded canaries are not in the data
    assert obs.sampled.sum() > 0 and np.array_equal(obs.included, canaries.included)


def test_virtual_batches_release_once_per_logical_batch():
    canaries = GradientCanaries(40, seed=12)
    engine, module, optimizer, loader, _ = private_run(canaries, sample_rate=0.5)
    chunks = 0
    with engine.virtual_batches(loader, max_physical_batch_size=4) as physical:
        for (x, y), ids in physical:
            optimizer.zero_grad()
            canaries.loss(F.cross_entropy(module(x), y, reduction="none"), ids).backward()
            optimizer.step()
            chunks += 1
    obs = canaries.observations()
    assert obs.steps == engine.steps == len(loader) < chunks
    np.testing.assert_allclose(obs.released[obs.sampled], 0.5, atol=1e-3)
    assert np.abs(obs.released[~obs.sampled]).max() < 1e-3


def test_empty_steps_still_release_noise_on_every_canary():
    canaries = GradientCanaries(30, seed=13)
    run = private_run(canaries, noise_multiplier=1.0, sample_rate=1e-9)
    train(*run[:4], canaries, steps=3)
    obs = canaries.observations()
    assert obs.steps == 3 and not obs.sampled.any()
    assert np.all(obs.released != 0) and np.all(np.isfinite(obs.released))


def test_the_user_model_is_untouched():
    canaries = GradientCanaries(10, seed=2)
    model = nn.Linear(FEATURES, CLASSES)
    keys = list(model.state_dict())
    both = canaries.module_with(model)
    assert both.model is model and both.canaries is canaries.head
    assert list(model.state_dict()) == keys
    x = torch.randn(4, FEATURES)
    assert torch.equal(both(x), model(x))


def test_collate_puts_a_filler_row_per_canary():
    canaries = GradientCanaries(30, seed=3)
    data = canaries.dataset(records(8))
    assert len(data) == 8 + int(canaries.included.sum())
    ids = np.flatnonzero(canaries.included)
    batch = data.collate([data[0], data[9], data[3], data[8]])
    assert isinstance(batch, CanaryBatch)
    x, y = batch.records
    assert x.shape == (4, FEATURES) and batch.canary_ids.tolist() == [-1, -1, ids[1], ids[0]]
    assert torch.equal(x[2], records(8)[0][0]) and torch.equal(x[3], records(8)[0][0])
    only_canaries = data.collate([data[8]])
    assert only_canaries.records[0].shape == (1, FEATURES)
    empty = data.collate([])
    assert empty.records[0].shape == (0, FEATURES) and empty.canary_ids.shape == (0,)
    with pytest.raises(ConfigError, match="the canaries need a filler record"):
        GradientCanaries(5, seed=4).dataset(records(0))
    no_records = GradientCanaries(5, seed=4).dataset(records(0), filler=records(1)[0])
    assert no_records.collate([no_records[0]]).records[0].shape == (1, FEATURES)


def test_filler_rows_add_nothing_to_the_model():
    """A batch of canaries only, noise off: the model's parameters get exactly zero."""
    canaries = GradientCanaries(30, seed=11)
    engine, module, optimizer, _, model = private_run(canaries, noise_multiplier=0.0)
    data = canaries.dataset(records())
    (x, y), ids = data.collate([data[N], data[N + 1]])
    optimizer.zero_grad()
    drawn(engine, len(x))
    canaries.loss(F.cross_entropy(module(x), y, reduction="none"), ids).backward()
    optimizer.step()
    assert torch.count_nonzero(model.weight.grad) == 0 and torch.count_nonzero(model.bias.grad) == 0
    released = canaries.observations().released[0]
    assert np.count_nonzero(released) == 2


def test_report_of_a_small_run_uses_the_engine_settings():
    canaries = GradientCanaries(100, seed=5)
    engine, *rest = private_run(canaries, noise_multiplier=2.0, max_grad_norm=1.0)
    train(engine, *rest[:3], canaries, steps=20)
    report = canaries.report(engine, delta=1e-5, guesses=(10, 10), simulations=100, seed=6)
    s = report.settings
    assert (s.num_canaries, s.steps, s.noise_multiplier, s.max_grad_norm) == (100, 20, 2.0, 1.0)
    assert s.sample_rate == engine.settings.sample_rate
    assert report.accountant_epsilon == engine.get_epsilon(1e-5)
    assert report.verdict == "consistent", report.text()


def test_watch_refuses_what_the_audit_cannot_describe():
    canaries = GradientCanaries(10, seed=7)
    engine = PrivacyEngine()
    with pytest.raises(PrivacyStateError, match="canaries.watch needs an engine after make_private"):
        canaries.watch(engine, torch.optim.SGD(canaries.head.parameters(), lr=0.1))
    canaries = GradientCanaries(10, seed=7)
    engine, _, optimizer, *_ = private_run(canaries, clipping="per_layer", watch=False)
    with pytest.raises(ConfigError, match="the canary audit needs flat clipping"):
        canaries.watch(engine, optimizer)
    canaries = GradientCanaries(10, seed=7, magnitude=100.0)
    engine, _, optimizer, *_ = private_run(canaries, watch=False)
    with pytest.raises(ConfigError, match="max_grad_norm must be below magnitude / 1000"):
        canaries.watch(engine, optimizer)
    canaries = GradientCanaries(10, seed=7)
    engine, module, optimizer, *_ = private_run(canaries, watch=False)
    with pytest.raises(ConfigError, match="the optimizer passed to make_private"):
        canaries.watch(engine, torch.optim.SGD(module.parameters(), lr=0.1))
    canaries = GradientCanaries(10, seed=7)
    engine, _, optimizer, *_ = private_run(canaries, watch=False)
    engine._distributed = object()  # stands in for a torch.distributed job (see tests/distributed)
    assert engine.data_parallel
    with pytest.raises(ConfigError, match="the canary audit runs in one process"):
        canaries.watch(engine, optimizer)


def test_watch_refuses_a_frozen_head():
    canaries = GradientCanaries(10, seed=8)
    canaries.head.weight.requires_grad_(False)
    engine, _, optimizer, *_ = private_run(canaries, watch=False)
    with pytest.raises(ConfigError, match="the optimizer must update the canary head"):
        canaries.watch(engine, optimizer)


def test_every_step_must_be_seen_once():
    canaries = GradientCanaries(20, seed=9)
    engine, module, optimizer, loader, _ = private_run(canaries, watch=False)
    with pytest.raises(PrivacyStateError, match="the canaries recorded no step"):
        canaries.observations()
    (x, y), _ = next(iter(loader))
    F.cross_entropy(module(x), y).backward()  # a step the canaries do not see
    optimizer.step()
    with pytest.raises(PrivacyStateError, match="must be called once, before the first step"):
        canaries.watch(engine, optimizer)


def test_loss_refuses_misuse():
    canaries = GradientCanaries(20, seed=10)
    losses, ids = torch.zeros(3), torch.tensor([-1, 1, 2])
    with pytest.raises(PrivacyStateError, match="canaries.loss needs canaries.watch"):
        canaries.loss(losses, ids)
    private_run(canaries)
    with pytest.raises(ConfigError, match="losses must have one value per row of the batch"):
        canaries.loss(torch.zeros(()), ids)
    canaries.loss(losses, ids)
    with pytest.raises(PrivacyStateError, match="each canary may enter a step at most once"):
        canaries.loss(torch.zeros(2), torch.tensor([-1, 2]))
