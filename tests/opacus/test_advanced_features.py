"""The port of Opacus's tutorial ``intro_to_advanced_features.ipynb``
(``scripts/advanced_features.py``): DP-SGD assembled by hand from ``GradSampleModule``,
``DPDataLoader``, ``DPOptimizer`` and an accountant hook; then the assembled pieces train, and
the optimizer's release is checked against its definition."""

import pytest
import torch

import privgrad.opacus
from privgrad.errors import PrivacyStateError
from privgrad.opacus.optimizers import PrivateOptimizer


@pytest.fixture
def g(run_script, engines, capsys):
    engines.watch(privgrad.opacus)
    out = run_script("advanced_features")
    out["printed"] = capsys.readouterr().out
    out["engines"] = engines.built
    return out


def test_make_private_returns_the_model_itself_and_a_view_of_the_optimizer(g):
    (engine,) = g["engines"]
    after = g["printed"].split("=" * 20)[1]
    assert "Model:<class '__main__.SampleNet'>" in after  # not a GradSampleModule
    assert isinstance(engine.privgrad_engine.optimizer, torch.optim.SGD)
    assert "Optimizer:<class 'privgrad.opacus.optimizers.view.PrivateOptimizer'>" in g["printed"]
    assert issubclass(PrivateOptimizer, torch.optim.Optimizer)


def test_grad_sample_module_and_the_accumulation_hook(g):
    assert "Equal to original:  True" in g["printed"]
    assert g["grad_sample"].shape == (10, 8, 16)
    assert isinstance(g["second_backward_error"], PrivacyStateError)
    assert "First backward successful" in g["printed"]
    assert g["model"].fc1.weight.grad_sample is None  # model.zero_grad() cleared them


def test_the_dp_data_loader_draws_poisson_batches(g):
    loader = g["dp_data_loader"]
    assert loader.dataset is g["DATASET"] and loader.sample_rate == 0.1
    assert len(loader) == 10 and len(g["batch_sizes"]) == 10
    assert g["expected_batch_size"] == 10
    assert len(set(g["batch_sizes"])) > 1  # Poisson: the sizes vary


def test_the_assembled_pieces_train_and_are_accounted(g):
    model, optimizer, loader = g["model"], g["optimizer"], g["data_loader"]
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert g["accountant"].history == [(1.0, 0.1, 10)]
    assert 0 < g["accountant"].get_epsilon(1e-5) < float("inf")
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_release_is_the_clipped_sum_plus_noise_over_the_expected_batch(g):
    model, optimizer = g["model"], g["optimizer"]
    optimizer.noise_multiplier = 0.0  # the clipping and the normaliser alone
    x, y = torch.randn(7, 16) * 50, torch.randint(0, 2, (7,))
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    samples = [p.grad_sample.clone() for p in model.parameters()]
    optimizer.pre_step()
    norms = torch.cat([s.flatten(1) for s in samples], 1).norm(dim=1)
    factor = (1.0 / norms).clamp(max=1.0)
    for p, s in zip(model.parameters(), samples):
        expected = torch.einsum("b,b...->...", factor, s) / 10  # expected, not realised (7)
        torch.testing.assert_close(p.grad, expected)
    with pytest.raises(PrivacyStateError, match="used by one optimizer step"):
        optimizer.pre_step()  # the same per-sample gradients twice


def test_the_laplace_subclass_overrides_the_noise_stage(g):
    torch.manual_seed(1)
    model = g["model"]
    optimizer = g["LaplaceDPOptimizer"](optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        noise_multiplier=1.0, max_grad_norm=1.0,
                                        expected_batch_size=10)
    optimizer.zero_grad()
    model(torch.randn(10, 16)).sum().backward()
    optimizer.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
