"""Automatic clipping (AUTO-S, Bu, Wang, Zha and Karypis, NeurIPS 2023): every example's gradient
becomes ``C g / (||g|| + gamma)``, so its contribution is below ``C`` whatever its norm.

Checked against a one-example loop on an unhooked copy of the model, in every engine mode, with
virtual batches, and at the bound (rows 3 and 4 of PRIVACY_TESTS.md run in
tests/privacy/test_conformance.py for this clipping too).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.engine import PerSampleGradients, private_step
from privgrad.errors import ConfigError
from privgrad.privatize import automatic_clip
from tests.helpers import drawn

MODES = ["auto", "ghost", "materialize"]
C, GAMMA = 0.7, 0.01


def test_factors_are_c_over_norm_plus_gamma():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    norms_sq = {a: torch.tensor([9.0, 0.0, 0.25, 1.0]), b: torch.tensor([16.0, 0.0, 0.0, float("nan")])}
    r = automatic_clip(norms_sq, 2.0, 0.01, 4)
    assert torch.allclose(r.weights, torch.tensor([2 / 5.01, 2 / 0.01, 2 / 0.51, 0.0]))
    assert r.keep.tolist() == [True, True, True, False]
    # every kept example is rescaled; "clipped" counts those whose gradient shrank
    assert (r.clipped, r.dropped) == (1, 1)
    contribution = r.weights[:3] * torch.tensor([5.0, 0.0, 0.5])
    assert (contribution < 2.0).all()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _reference(model, x, y, scale) -> dict[str, torch.Tensor]:
    """``sum_b C g_b / (||g_b|| + gamma)`` from a one-example loop on a model without hooks."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum") * scale[i]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        for (n, _), g in zip(model.named_parameters(), grads):
            total[n] += C * g / (norm + GAMMA)
    return total


@pytest.mark.parametrize("mode", MODES)
def test_the_update_is_the_sum_of_normalised_gradients(mode):
    model = _model()
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=8),
                        noise_multiplier=0.0, max_grad_norm=C, clipping="automatic", gamma=GAMMA,
                        loss_reduction="sum", grad_sample_mode=mode)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    scale = torch.tensor([1e-4, 1e-2, 1.0, 1.0, 10.0, 1e3, 1e6], dtype=torch.float64)
    expected = _reference(plain, x, y, scale)
    for _ in range(2):  # the self-checked first pass, then the fast path
        optimizer.zero_grad()
        drawn(engine, len(x))
        (nn.functional.cross_entropy(model(x), y, reduction="none") * scale).sum().backward()
        optimizer.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12)
    assert engine.last_step_stats.examples == 7


def test_virtual_batches_equal_one_big_batch():
    runs = []
    for chunk in (None, 3):
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine(accountant="rdp")
        g = torch.Generator().manual_seed(2)
        data = TensorDataset(torch.randn(40, 5, generator=g, dtype=torch.float64),
                             torch.randint(0, 3, (40,), generator=g))
        torch.manual_seed(3)
        _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                       data_loader=DataLoader(data, batch_size=10),
                                       noise_multiplier=0.0, max_grad_norm=C,
                                       clipping="automatic", gamma=GAMMA)
        if chunk is None:
            for x, y in dl:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        else:
            with engine.virtual_batches(dl, chunk) as chunks:
                for x, y in chunks:
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    optimizer.step()
        runs.append([p.detach().clone() for p in model.parameters()])
        assert engine.steps == 4
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_functional_step_takes_it():
    model = _model()
    plain = copy.deepcopy(model)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with PerSampleGradients(model, mode="auto") as psg:
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    private_step(psg.batch, list(model.parameters()), noise_multiplier=0.0, max_grad_norm=C,
                 clipping="automatic", gamma=GAMMA)
    expected = _reference(plain, x, y, torch.ones(4, dtype=torch.float64))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma, message", [
    (0.0, r"gamma must be > 0 and finite; got gamma=0\.0"),
    (-1.0, r"gamma must be > 0 and finite; got gamma=-1\.0"),
    (float("nan"), r"gamma must be > 0 and finite"),
])
def test_a_bad_gamma_is_refused(gamma, message):
    model = _model()
    with pytest.raises(ConfigError, match=message):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2),
            noise_multiplier=1.0, max_grad_norm=1.0, clipping="automatic", gamma=gamma)


def test_gamma_without_automatic_clipping_is_refused():
    model = _model()
    with pytest.raises(ConfigError, match=r"gamma is an option of clipping='automatic'; got gamma=0\.1 with clipping='flat'"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2),
            noise_multiplier=1.0, max_grad_norm=1.0, gamma=0.1)
