"""Per-layer adaptive clipping: one quantile-following bound per parameter.

Each step releases one centred count per parameter (``K`` counts): one example moves them by
``sqrt(K) / 2`` together and the gradient by ``C_t`` (the per-layer bounds' root-sum-of-squares),
so the gradient's noise multiplier is ``(z^-2 - K (2 sigma_b)^-2)^(-1/2)``. The same checks as
tests/privatize/test_adaptive_clipping.py, parameter by parameter.
"""

from __future__ import annotations

import copy
import math

import dp_accounting
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.errors import ConfigError
from privgrad.privatize.adaptive import default_count_noise, gradient_noise_multiplier
from tests.privacy.checks import assert_gaussian, forever
from tests.privatize.test_adaptive_clipping import (BATCH, N, Recording, attach, data, model,
                                                    norms, train)

K = 4  # the model's parameters: two weights, two biases


def test_each_bound_follows_its_parameters_quantile():
    net = model()
    reference = norms(copy.deepcopy(net), data(), per_param=True)  # (N, K)
    noise = Recording()
    engine, optimizer, dl = attach(net, noise=noise, clipping="per_layer_adaptive",
                                   max_grad_norm=[0.05, 0.01, 5.0, 1.0])
    batches = []
    train(engine, optimizer, dl, net, 40, on_step=lambda i: batches.append(i))
    sigma_b = default_count_noise(BATCH, 1.0, K)
    assert sigma_b == 2.0  # sqrt(4) z: the paper's m / 20 = 0.6 would leave too little
    adaptive = engine.adaptive_clipping
    assert adaptive.per_layer and adaptive.count_noise_std == sigma_b
    bound, bounds, estimates = np.array([0.05, 0.01, 5.0, 1.0]), [], []
    for i, (draw, std) in zip(batches, noise.draws):
        assert std == sigma_b and len(draw) == K
        bounds.append(tuple(bound))
        within = (reference[i] <= torch.from_numpy(bound)).sum(0).numpy()
        estimate = (within - len(i) / 2 + np.array(draw)) / BATCH + 0.5
        estimates.append(tuple(estimate))
        bound = bound * np.exp(-0.3 * (estimate - 0.5))
    np.testing.assert_allclose(np.array(adaptive.bounds), np.array(bounds), rtol=1e-12)
    np.testing.assert_allclose(np.array(adaptive.estimates), np.array(estimates), rtol=1e-9, atol=1e-12)
    assert engine.clipping_bound == pytest.approx(math.hypot(*bound), rel=1e-12)
    medians = reference.median(0).values.numpy()
    assert (np.abs(np.log(np.array(adaptive.bound) / medians)) < math.log(3)).all()


def test_the_gradient_noise_pays_for_k_counts():
    net = model()
    engine, optimizer, dl = attach(net, sigma=0.8, clipping="per_layer_adaptive")
    z_grad = gradient_noise_multiplier(0.8, default_count_noise(BATCH, 0.8, K), K)
    assert engine.settings.gradient_noise_multiplier == z_grad == pytest.approx(0.8 / math.sqrt(0.75))
    rows, steps = [], 0
    while steps < 300:
        for x, y, _ in dl:
            optimizer.zero_grad()
            (net(x).sum() * 0.0).backward()
            optimizer.step()  # released in units of the bounds' root-sum-of-squares
            rows.append(torch.cat([p.grad.flatten() for p in net.parameters()]).numpy())
            steps += 1
            if steps == 300:
                break
    assert_gaussian(np.stack(rows), z_grad / BATCH, "per-layer adaptive gradient noise")


@pytest.mark.parametrize("z, sigma_b", [(0.5, 1.0), (1.0, 3.0)])
def test_the_split_is_one_gaussian_at_z(z, sigma_b):
    z_grad = gradient_noise_multiplier(z, sigma_b, K)
    parts = [dp_accounting.GaussianDpEvent(z_grad)] + [dp_accounting.GaussianDpEvent(2 * sigma_b)] * K
    eps = [dp_accounting.pld.PLDAccountant().compose(e).get_epsilon(1e-5)
           for e in (dp_accounting.ComposedDpEvent(parts), dp_accounting.GaussianDpEvent(z))]
    assert eps[0] == pytest.approx(eps[1], rel=2e-3)


@pytest.mark.parametrize("weight", [1e4, 1e-8], ids=["clipped", "within"])
def test_one_example_moves_each_release_by_its_sensitivity(weight):
    """D versus D + x with the same seeds and bounds: each parameter's gradient release moves by
    at most its C_k, every count's estimate by exactly 1 / (2 m)."""
    full, runs = data(), []
    for n in (N - 1, N):
        net = model()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        engine = PrivacyEngine(accountant="rdp")
        torch.manual_seed(4)
        _, _, dl = engine.make_private(
            module=net, optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(*(t[:n] for t in full.tensors)), batch_size=BATCH),
            noise_multiplier=0.0, max_grad_norm=0.05, clipping="per_layer_adaptive",
            count_noise_std=0.5, loss_reduction="sum", sample_rate=BATCH / N,
            expected_batch_size=float(BATCH))
        runs.append((net, optimizer, engine, forever(dl)))
    scale = torch.ones(N, dtype=torch.float64)
    scale[-1] = weight
    present = []
    for _ in range(30):
        runs[1][2].adaptive_clipping.bound = runs[0][2].adaptive_clipping.bound
        bounds = runs[0][2].adaptive_clipping.bound
        grads = []
        for net, opt, _, it in runs:
            x, y, i = next(it)
            opt.zero_grad()
            (nn.functional.cross_entropy(net(x), y, reduction="none") * scale[i]).sum().backward()
            opt.step()
            grads.append([p.grad * math.hypot(*bounds) for p in net.parameters()])  # the sums
        present.append(N - 1 in i.tolist())
        gaps = np.abs(np.array(runs[1][2].adaptive_clipping.estimates[-1])
                      - np.array(runs[0][2].adaptive_clipping.estimates[-1]))
        diffs = [float((b - a).norm()) for a, b in zip(*grads)]
        if present[-1]:
            assert all(d <= c * (1 + 1e-6) for d, c in zip(diffs, bounds)), (diffs, bounds)
            np.testing.assert_allclose(gaps, 1 / (2 * BATCH), rtol=1e-9)
        else:
            assert max(diffs) == 0.0 and gaps.max() == 0.0
    assert any(present) and not all(present)


def test_resume_continues_every_bound_exactly(tmp_path):
    def run(stop_at=None, resume=None):
        net = model()
        engine, optimizer, dl = attach(net, sigma=0.7, clipping="per_layer_adaptive")
        if resume is not None:
            engine.load_checkpoint(resume, module=net, optimizer=optimizer)
        train(engine, optimizer, dl, net, stop_at if stop_at is not None else 12 - engine.steps)
        if stop_at is not None:
            engine.save_checkpoint(tmp_path / "run.pt", module=net, optimizer=optimizer)
        return engine.adaptive_clipping

    whole = run()
    run(stop_at=5)
    resumed = run(resume=tmp_path / "run.pt")
    assert resumed.bounds == whole.bounds and resumed.estimates == whole.estimates
    assert resumed.bound == whole.bound and isinstance(resumed.bound, tuple)


def test_too_little_count_noise_for_k_counts_is_refused():
    net = model()
    with pytest.raises(ConfigError, match=r"count_noise_std must exceed sqrt\(4 bounds\) \* "
                                          r"noise_multiplier / 2 = 1 .*got count_noise_std=0\.9"):
        PrivacyEngine().make_private(
            module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            data_loader=DataLoader(data(), batch_size=BATCH), noise_multiplier=1.0,
            max_grad_norm=1.0, clipping="per_layer_adaptive", count_noise_std=0.9)


def test_a_parameter_unfrozen_later_is_refused_as_under_fixed_per_layer_bounds():
    """Its bound would be new, raising the sensitivity above the bounds' C: nothing released."""
    from privgrad.errors import PrivacyStateError

    net = model()
    net[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=net, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=1.0, max_grad_norm=1.0,
                                   clipping="per_layer_adaptive")
    assert engine.adaptive_clipping.counts == 3
    net[0].weight.requires_grad_(True)
    x, y, _ = next(iter(dl))
    with pytest.raises(PrivacyStateError, match="per-layer clipping fixes one bound per parameter"):
        nn.functional.cross_entropy(net(x), y).backward()
    assert engine.steps == 0 and engine.adaptive_clipping.bounds == []


def test_a_parameter_no_example_reached_counts_every_example_within():
    """Its per-example norm is 0: within its bound for every kept example."""
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    unused = nn.Linear(2, 2).double()  # trainable, in the optimizer, never called
    holder = nn.ModuleDict({"net": net, "unused": unused})
    optimizer = torch.optim.SGD(holder.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    torch.manual_seed(1)
    _, _, dl = engine.make_private(module=holder, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=0.0, max_grad_norm=1.0,
                                   clipping="per_layer_adaptive", count_noise_std=1e-6,
                                   loss_reduction="sum")
    x, y, _ = next(iter(dl))
    optimizer.zero_grad()
    nn.functional.cross_entropy(holder["net"](x), y, reduction="sum").backward()
    optimizer.step()
    estimates = engine.adaptive_clipping.estimates[0]
    n = len(x)
    assert estimates[-2:] == pytest.approx(((n - n / 2) / BATCH + 0.5,) * 2, abs=1e-5)
