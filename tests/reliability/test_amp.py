"""Mixed precision: autocast and GradScaler against float32, skipped steps, bad scalers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.engine.amp import float32_captures
from privgrad.errors import ConfigError, ConfigTypeError, PrivacyStateError
from tests.helpers import drawn
from tests.reliability import checks


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("dtype, scale", [
    (torch.bfloat16, None), (torch.float16, None), (torch.float16, 2.0**16),
    (torch.bfloat16, 2.0**4),
])
def test_autocast_matches_float32(dtype, scale, mode):
    checks.check_amp_matches_float32(dtype, scale, mode)


@pytest.mark.parametrize("clipping", ["automatic", "adaptive"])
@pytest.mark.parametrize("dtype, scale", [(torch.bfloat16, None), (torch.float16, 2.0**16)])
def test_clipping_without_tuning_under_autocast_matches_float32(dtype, scale, clipping):
    """The loss scale is out of the norms before automatic clipping's factors and adaptive
    clipping's count are formed."""
    checks.check_amp_matches_float32(dtype, scale, "auto", clipping=clipping)


def test_loss_scale_does_not_change_the_update():
    """Two scales, the same update bit for bit: the division by a power of two is exact."""
    x, y = checks.amp_batch()
    kwargs = dict(max_grad_norm=7.6, loss_reduction="sum")
    updates = [checks.one_step_update(checks.mlp(), kwargs, x, y, autocast=torch.bfloat16,
                                      grad_scaler=torch.amp.GradScaler("cpu", init_scale=s))[0]
               for s in (2.0**3, 2.0**12)]
    for name in updates[0]:
        assert torch.equal(updates[0][name], updates[1][name]), name


def test_per_sample_work_is_float32():
    seen = []
    model = checks.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    x, y = checks.amp_batch()
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(TensorDataset(x, y), batch_size=16),
                        noise_multiplier=0.0, max_grad_norm=1.0)
    original = engine._clipped.add
    engine._clipped.add = lambda batch, params: seen.append(batch) or original(batch, params)
    drawn(engine, len(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert {sq.dtype for sq in seen[0].norms_sq.values()} == {torch.float32}


def test_float32_captures_leaves_float32_captures_alone():
    from privgrad.layers import Capture

    c = Capture(module=nn.Linear(2, 2), args=(torch.randn(3, 2),), kwargs={}, batch_size=3,
                grad_outputs=[torch.randn(3, 2)])
    assert float32_captures([c])[0] is c
    half = Capture(module=c.module, args=(c.args[0].half(),), kwargs={}, batch_size=3,
                   grad_outputs=[c.grad_outputs[0].half()])
    half.scratch["projections"] = "computed during backward from the half, scaled gradients"
    up = float32_captures([half], loss_scale=4.0)[0]
    assert up.args[0].dtype == torch.float32
    assert torch.equal(up.grad_outputs[0], half.grad_outputs[0].float() / 4)
    assert up.scratch == {}  # recomputed from the float32, unscaled gradients


def test_skipped_step_leaves_nothing_behind():
    checks.check_skipped_step_is_discarded()


def test_without_a_scaler_a_missing_step_is_an_error():
    model = checks.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    x, y = checks.amp_batch(8)
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
                        noise_multiplier=0.0, max_grad_norm=1.0)
    drawn(engine, 4)
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    drawn(engine, 4)
    with pytest.raises(PrivacyStateError, match="one backward pass per optimizer.step"):
        F.cross_entropy(model(x[4:]), y[4:]).backward()


def test_an_overflowing_example_is_dropped_not_a_skipped_step():
    """fp16 overflow in one example's gradient: the scaler sees no inf (it would skip the step, a
    visible event that depends on that example), the example is dropped and counted, and the
    step is released and accounted."""
    model = checks.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    engine = PrivacyEngine(accountant="rdp")
    x, y = checks.amp_batch(8)
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
                        noise_multiplier=1.0, max_grad_norm=1.0, grad_scaler=scaler)
    drawn(engine, len(x))
    with torch.autocast("cpu", dtype=torch.float16):
        losses = F.cross_entropy(model(x), y, reduction="none")
    weights = torch.ones(8)
    weights[3] = 1e4  # x 2**16 overflows float16 in backward
    scaler.scale((losses.float() * weights).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert engine.steps == 1 and engine.accountant.steps == 1
    assert engine.last_step_stats.dropped == 1 and engine.dropped_examples == 1
    assert scaler.get_scale() == 2.0**16  # no backoff: the scaler saw no inf
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("scaler, kind, message", [
    ("not a scaler", ConfigTypeError, "grad_scaler must be a torch.amp.GradScaler; got grad_scaler=str"),
    (torch.amp.GradScaler("cpu", init_scale=1000.0), ConfigError,
     r"scale must be a power of two .*got grad_scaler scale=1000.0\. Use GradScaler\(init_scale=2."),
    (torch.amp.GradScaler("cpu", growth_factor=3.0), ConfigError, "growth_factor must be a power of two"),
])
def test_bad_grad_scaler_is_refused_and_nothing_attached(scaler, kind, message):
    model = checks.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    x, y = checks.amp_batch(8)
    with pytest.raises(kind, match=message):
        engine.make_private(module=model, optimizer=optimizer,
                            data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
                            noise_multiplier=1.0, max_grad_norm=1.0, grad_scaler=scaler)
    assert engine._module is None and engine._amp is None


def test_a_disabled_scaler_is_a_no_op():
    x, y = checks.amp_batch()
    kwargs = dict(max_grad_norm=7.6, loss_reduction="sum")
    ref, _ = checks.one_step_update(checks.mlp(), kwargs, x, y)
    got, _ = checks.one_step_update(checks.mlp(), kwargs, x, y,
                                    grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


class _Recurrent(nn.Module):
    """A recurrent layer with a layer under it (whose per-sample work, without a scaler, is
    done during backward: the joint backward)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.lin, self.rnn, self.head = nn.Linear(10, 6), nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 4)

    def forward(self, x):
        out, _ = self.rnn(torch.tanh(self.lin(x.view(len(x), 2, 5).repeat(1, 1, 2))))
        return self.head(out[:, -1])


def test_loss_scale_does_not_change_a_recurrent_update():
    """With it left in the gradients, unclipped examples would enter the sum multiplied by
    the scale."""
    x, y = checks.amp_batch()
    kwargs = dict(max_grad_norm=1.0, loss_reduction="sum")
    ref, ref_engine = checks.one_step_update(_Recurrent(), kwargs, x, y)
    assert 0 < ref_engine.last_step_stats.clipped < len(x)  # the bound binds for some only
    for scale in (2.0**4, 2.0**12):
        got, _ = checks.one_step_update(_Recurrent(), kwargs, x, y,
                                        grad_scaler=torch.amp.GradScaler("cpu", init_scale=scale))
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7)
    bf16, _ = checks.one_step_update(_Recurrent(), kwargs, x, y, autocast=torch.bfloat16)
    for name in ref:  # autocast without a scaler: the joint backward runs
        err = (bf16[name] - ref[name]).norm() / ref[name].norm()
        assert err < 2e-2, f"bfloat16: {name} relative error {err:.2e}"
