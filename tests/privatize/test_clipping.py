"""Clip factors and the functional private step, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privgrad.engine import PerSampleGradients
from privgrad.errors import ConfigError
from privgrad.engine import private_step
from privgrad.privatize import flat_clip, per_layer_clip
from privgrad.privatize.clipping import per_layer_bounds
from tests.reference import assert_close


def test_flat_factors():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    norms_sq = {a: torch.tensor([9.0, 0.0, 0.25, 1.0]), b: torch.tensor([16.0, 0.0, 0.0, float("nan")])}
    r = flat_clip(norms_sq, 1.0, 4)
    assert torch.allclose(r.weights, torch.tensor([0.2, 1.0, 1.0, 0.0]))
    assert r.keep.tolist() == [True, True, True, False]
    assert (r.clipped, r.dropped) == (1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_factors_without_a_drop_are_the_general_formula_bit_for_bit(dtype):
    # every norm finite: no keep mask (nothing to drop), factors written over the norms; they
    # must equal min(1, C / norm) as the general path forms it, exactly, zeros and huge included
    g = torch.Generator().manual_seed(0)
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    sq_a = torch.rand(64, generator=g, dtype=dtype) * 9
    sq_b = torch.rand(64, generator=g, dtype=dtype) * 9
    sq_a[:3], sq_b[:3] = 0.0, torch.tensor([0.0, 1e30, 1e-30], dtype=dtype)
    r = flat_clip({a: sq_a, b: sq_b}, 1.3, 64)
    norm = (sq_a + sq_b).sqrt()
    assert r.keep is None and r.dropped == 0
    assert torch.equal(r.weights, (1.3 / norm).clamp(max=1.0).nan_to_num(nan=0.0))
    assert r.clipped == int((norm > 1.3).sum()) and r.within == 64 - r.clipped
    assert r.weights[0] == 1.0 and r.weights[1] < 1e-14


def test_per_layer_factors_and_bounds():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    bounds = per_layer_bounds([a, b], 2.0)
    assert bounds[a] == bounds[b] == pytest.approx(2.0 / math.sqrt(2))
    assert math.sqrt(sum(c * c for c in bounds.values())) == pytest.approx(2.0)
    r = per_layer_clip({a: torch.tensor([8.0, 1.0]), b: torch.tensor([1.0, float("inf")])},
                       {a: 1.0, b: 2.0}, 2)
    assert torch.allclose(r.weights[a], torch.tensor([1 / math.sqrt(8), 0.0]))
    assert torch.allclose(r.weights[b], torch.tensor([1.0, 0.0]))
    assert r.keep.tolist() == [True, False] and r.dropped == 1 and r.clipped == 1
    assert per_layer_bounds([a, b], [0.5, 1.5]) == {a: 0.5, b: 1.5}


def test_private_step_writes_the_clipped_sum_plus_noise():
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64) * 10
    with PerSampleGradients(model, mode="auto") as psg:
        model(x).square().sum().backward()
    norms = psg.norms
    stats = private_step(psg.batch, list(model.parameters()), noise_multiplier=0.0,
                         max_grad_norm=0.5, normaliser=4.0)
    written = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert stats.examples == 5 and stats.clipped == int((norms > 0.5).sum())

    with PerSampleGradients(model, mode="materialize") as ref:
        model(x).square().sum().backward()
    w = (0.5 / ref.norms).clamp(max=1)
    for name in written:
        expected = torch.einsum("b,b...->...", w, ref.gradients[name]) / 4.0
        assert_close(written[name], expected, 1e-12, name)

    torch.manual_seed(0)
    private_step(psg.batch, list(model.parameters()), noise_multiplier=2.0, max_grad_norm=0.5)
    torch.manual_seed(0)
    noise = torch.empty(2, 3, dtype=torch.float64).normal_(0, 1.0)
    clipped = torch.einsum("b,b...->...", w, ref.gradients["weight"])
    assert_close(model.weight.grad, clipped + noise, 1e-12)


def test_private_step_bad_input():
    model = nn.Linear(3, 2)
    with PerSampleGradients(model) as psg:
        F.mse_loss(model(torch.randn(2, 3)), torch.zeros(2, 2)).backward()
    with pytest.raises(ConfigError, match="max_grad_norm must be > 0"):
        private_step(psg.batch, list(model.parameters()), noise_multiplier=1.0, max_grad_norm=0)
    with pytest.raises(ConfigError, match="noise_multiplier must be finite and >= 0"):
        private_step(psg.batch, list(model.parameters()), noise_multiplier=-2, max_grad_norm=1)
