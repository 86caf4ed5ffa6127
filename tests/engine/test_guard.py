"""The state guard (row 15): no forward or backward pass may write the model's parameters or
buffers while the engine is attached, whatever the layer type; the optimizer's step and user code
between steps may."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.errors import PrivacyStateError


class EMA(nn.Module):
    """A custom layer that keeps a running average of its inputs (an EMA buffer)."""

    def __init__(self, d=3):
        super().__init__()
        self.register_buffer("average", torch.zeros(d))

    def forward(self, x):
        if self.training:
            self.average.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x - self.average


class NativeStats(nn.Module):
    """Running statistics written by a native kernel, which PyTorch's version counter misses."""

    def __init__(self, d=3):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("var", torch.ones(d))

    def forward(self, x):
        out = F.batch_norm(x, self.mean, self.var, training=self.training)
        return x + 0.0 * out  # keeps examples separate: only the buffer write is at issue


class WritesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer):
        ctx.buffer = buffer
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.buffer.add_(g.detach().sum(0))  # a statistic of the private batch's gradients
        return g, None


class BackwardWriter(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.register_buffer("seen", torch.zeros(d))

    def forward(self, x):
        return WritesInBackward.apply(x, self.seen)


def _attach(middle: nn.Module):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), middle, nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=1.0,
                                   max_grad_norm=1.0,
                                   data_loader=DataLoader(TensorDataset(torch.randn(40, 3)),
                                                          batch_size=10))
    return model, opt, engine, dl


def _refused_for_good(engine, opt):
    """After a caught write the engine releases nothing more and exports no state."""
    with pytest.raises(PrivacyStateError, match="releases nothing more"):
        opt.step()
    with pytest.raises(PrivacyStateError, match="releases nothing more"):
        engine.state_dict()
    assert engine.steps == 0


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("call", ["root", "submodule"])
def test_a_custom_running_average_is_refused_naming_module_and_tensor(grad, call):
    model, opt, engine, dl = _attach(EMA())
    (x,) = next(iter(dl))
    with torch.set_grad_enabled(grad), pytest.raises(
            PrivacyStateError, match=r"1\.average written in place during the forward pass of "
                                     r"module (<root>|1)"):
        model(x) if call == "root" else model[1](x)
    _refused_for_good(engine, opt)


def test_a_native_write_the_version_counter_misses_is_caught_on_the_first_step():
    model, opt, engine, dl = _attach(NativeStats())
    (x,) = next(iter(dl))
    assert model[1].mean._version == 0
    with pytest.raises(PrivacyStateError, match=r"1\.mean, 1\.var written in place"):
        model(x).sum().backward()
    _refused_for_good(engine, opt)


def test_a_write_during_backward_is_caught_before_the_release():
    model, opt, engine, dl = _attach(BackwardWriter())
    (x,) = next(iter(dl))
    out = model(x).sum()
    with pytest.raises(PrivacyStateError, match=r"1\.seen written in place during the backward"):
        out.backward()
    _refused_for_good(engine, opt)


def test_the_step_and_post_processing_between_steps_are_allowed():
    model, opt, engine, dl = _attach(nn.Tanh())
    for _ in range(2):
        for (x,) in dl:
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            with torch.no_grad():  # a projection of the released weights: post-processing
                model[0].weight.clamp_(-0.5, 0.5)
    assert engine.steps == 8 and engine._guard.violation is None


def test_eval_mode_running_statistics_do_not_move_and_are_allowed():
    model, opt, engine, dl = _attach(EMA())
    model.eval()
    for (x,) in dl:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert engine.steps == 4 and torch.equal(model[1].average, torch.zeros(3))


def test_detach_removes_the_guard():
    model, opt, engine, dl = _attach(EMA())
    engine.detach()
    model(torch.randn(4, 3))  # an ordinary model again: its running average moves
    assert model[1].average.abs().sum() > 0
