"""``optimizer.step(closure)`` (LBFGS, Lightning's automatic optimization) gets the private
gradient, never the raw one the closure's backward leaves in ``p.grad``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from tests.helpers import drawn


def _private(noise_multiplier):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = TensorDataset(torch.randn(64, 4) * 10, torch.randint(0, 2, (64,)))
    engine = PrivacyEngine()
    model, optimizer, _ = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=32),
        noise_multiplier=noise_multiplier, max_grad_norm=1e-3)
    return engine, model, optimizer, data.tensors


@pytest.mark.parametrize("positional", [True, False])
def test_closure_step_equals_backward_then_step(positional):
    plain_engine, plain, plain_opt, (x, y) = _private(0.0)
    plain_opt.zero_grad()
    drawn(plain_engine, len(x))
    F.cross_entropy(plain(x), y).backward()
    plain_opt.step()

    engine, model, optimizer, _ = _private(0.0)
    start = model.weight.detach().clone()
    start_loss = F.cross_entropy(F.linear(x, start, model.bias.detach().clone()), y)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    drawn(engine, len(x))
    loss = optimizer.step(closure) if positional else optimizer.step(closure=closure)
    assert loss.item() == pytest.approx(start_loss.item())  # the closure ran once, before the update
    assert engine.steps == 1
    torch.testing.assert_close(model.weight, plain.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.bias, plain.bias, rtol=0, atol=0)
    # every example's gradient was clipped to 1e-3: the mean-normalised update is that small
    assert (model.weight - start).norm() <= 1e-3 * 1.0 + 1e-9


def test_closure_step_is_noised():
    engine, model, optimizer, (x, y) = _private(1e4)
    start = model.weight.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    drawn(engine, len(x))
    optimizer.step(closure)
    # noise std per coordinate is 1e4 * 1e-3 / 32 ~ 0.3: far above the clipped signal (<= 1e-3)
    assert (model.weight - start).abs().max() > 0.05
