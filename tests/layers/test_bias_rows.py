"""Per-sample bias gradients (``sum_t G_bt``) of a Linear layer over sequences and of a
convolution, formed once by the ghost norm and read again by the weighted sum
(``capture.scratch["bias_rows"]``) instead of a second pass over the output gradient: the same
numbers as before, one reduction of ``G`` per step, and a masked capture (dropped examples) that
never reads rows formed before the mask."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from privgrad.layers.base import Capture
from privgrad.layers.conv import ConvRule
from privgrad.layers.linear import LinearRule


class Reductions(TorchDispatchMode):
    """Counts sums over the positions of a ``(b, t, o)`` tensor."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.sum.dim_IntList and tuple(args[0].shape) == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


def capture(layer, x, g) -> Capture:
    return Capture(module=layer, args=(x,), kwargs={}, batch_size=x.shape[0],
                   names=("weight", "bias"), grad_outputs=[g])


def case(dtype):
    torch.manual_seed(0)
    layer = nn.Linear(5, 7).to(dtype)
    return layer, torch.randn(4, 6, 5, dtype=dtype), torch.randn(4, 6, 7, dtype=dtype), \
        torch.rand(4, dtype=dtype)


def test_the_kept_rows_give_the_same_norms_and_sums_bit_for_bit():
    rule, names = LinearRule(), ("weight", "bias")
    for dtype in (torch.float32, torch.float64):
        layer, x, g, w = case(dtype)
        c = capture(layer, x, g)
        with Reductions(g.shape) as seen:
            norms = rule.ghost_norms_sq(layer, c, names)
            sums = rule.weighted_sum(layer, c, names, w)
        assert seen.count == 1  # one pass over G for the bias, not two
        assert torch.equal(norms["bias"], g.sum(1).square().sum(1))
        fresh = rule.weighted_sum(layer, capture(layer, x, g), names, w)  # nothing kept
        assert torch.equal(sums["bias"], fresh["bias"]) and torch.equal(sums["bias"], w @ g.sum(1))
        assert torch.equal(sums["weight"], fresh["weight"])


def test_a_masked_capture_sums_only_the_kept_examples():
    """A dropped example whose output gradient is not finite: the masked copy has no kept rows,
    so its bias sum is finite and equals the sum over the other examples."""
    rule, names = LinearRule(), ("weight", "bias")
    layer, x, g, w = case(torch.float64)
    g[1, 2, 3] = float("inf")
    keep = torch.tensor([True, False, True, True])
    c = capture(layer, x, g)
    rule.ghost_norms_sq(layer, c, names)  # keeps rows with the inf in example 1
    sums = rule.weighted_sum(layer, rule.masked(c, keep), names, torch.where(keep, w, 0))
    want = (w[keep] @ g[keep].sum(1))
    assert torch.isfinite(sums["bias"]).all() and torch.allclose(sums["bias"], want, rtol=1e-12)


def test_half_precision_output_gradients_sum_in_float32_for_both():
    rule, names = LinearRule(), ("weight", "bias")
    layer, x, g, w = case(torch.float32)
    layer, x, g, w = layer.half(), x.half(), g.half(), w.half()
    c = capture(layer, x, g)
    norms = rule.ghost_norms_sq(layer, c, names)
    sums = rule.weighted_sum(layer, c, names, w)
    rows = g.float().sum(1)
    assert norms["bias"].dtype == torch.float32 and torch.equal(norms["bias"], rows.square().sum(1))
    assert sums["bias"].dtype == torch.float16
    assert torch.allclose(sums["bias"].float(), w.float() @ rows, rtol=2e-3, atol=2e-3)


def test_a_convolution_keeps_its_bias_rows_too():
    torch.manual_seed(0)
    layer, rule, names = nn.Conv2d(3, 4, 3, padding=1).double(), ConvRule(), ("weight", "bias")
    x, g, w = torch.randn(5, 3, 6, 6).double(), torch.randn(5, 4, 6, 6).double(), torch.rand(5).double()
    c = capture(layer, x, g)
    with Reductions((5, 4, 36)) as seen:
        norms = rule.ghost_norms_sq(layer, c, names)
        sums = rule.weighted_sum(layer, c, names, w)
    assert seen.count == 1
    rows = g.flatten(2).sum(-1)
    assert torch.equal(norms["bias"], rows.square().sum(1)) and torch.equal(sums["bias"], w @ rows)
    keep = torch.tensor([True, True, False, True, True])
    g[2, 0, 0, 0] = float("nan")
    c = capture(layer, x, g)
    rule.ghost_norms_sq(layer, c, names)
    masked = rule.weighted_sum(layer, rule.masked(c, keep), names, torch.where(keep, w, 0))
    assert torch.allclose(masked["bias"], w[keep] @ g[keep].flatten(2).sum(-1), rtol=1e-12)
