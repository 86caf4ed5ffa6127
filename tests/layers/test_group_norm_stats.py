"""GroupNorm's per-sample gradients from the forward's own statistics
(``GroupNormRule.keep_from_forward``): the same numbers as normalising the input again, bit for
bit, with one group-norm forward per call instead of two; a recomputation wherever the kept
statistics do not fit (another dtype) and while the engine self-checks."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from privgrad.engine import PerSampleGradients
from privgrad.layers.base import Capture
from privgrad.layers.norm import GroupNormRule
from tests.layers.cases import check_module


class GroupNormForwards(TorchDispatchMode):
    """Counts ``aten.native_group_norm`` calls (the layer's forward and any recomputation)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.native_group_norm.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(8 * 5 * 5, 3)).to(dtype)


def recomputed(norm: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor) -> dict:
    """The rule without kept statistics: the input normalised again."""
    capture = Capture(module=norm, args=(x,), kwargs={}, batch_size=x.shape[0],
                      names=("weight", "bias"), grad_outputs=[g])
    return GroupNormRule().per_sample_gradients(norm, capture, ("weight", "bias"))


def test_the_forward_statistics_give_the_recomputed_gradients_bit_for_bit():
    for dtype in (torch.float32, torch.float64):
        net = model(dtype)
        x = torch.randn(6, 3, 5, 5, dtype=dtype)
        seen = {}

        def keep(m, args, out):  # the layer's input, and its output's gradient (before the
            seen.update(x=args[0].detach())  # in-place ReLU changes the output)
            out.register_hook(lambda g: seen.update(g=g.detach()))
        net[1].register_forward_hook(keep)
        with GroupNormForwards() as calls, PerSampleGradients(net, mode="materialize") as psg:
            net(x).square().sum().backward()
        assert calls.count == 1  # the layer's own forward; nothing normalised again
        want = recomputed(net[1], seen["x"], seen["g"])
        for name in ("weight", "bias"):
            got = psg.gradients[f"1.{name}"]
            assert got.dtype == dtype and torch.equal(got, want[name]), (dtype, name)


def test_statistics_of_another_dtype_are_not_used():
    norm = nn.GroupNorm(2, 4)
    x, g = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    stats = torch.ops.aten.native_group_norm(x.double(), None, None, 3, 4, 6, 2, norm.eps)[1:]
    capture = Capture(module=norm, args=(x,), kwargs={}, batch_size=3, names=("weight", "bias"),
                      grad_outputs=[g], scratch={"group_stats": stats})
    kept = GroupNormRule().per_sample_gradients(norm, capture, ("weight", "bias"))
    want = recomputed(norm, x, g)
    assert all(torch.equal(kept[n], want[n]) and kept[n].dtype == torch.float32 for n in want)


def test_group_norm_models_still_match_the_one_example_references():
    check_module(model(torch.float64), (torch.randn(4, 3, 5, 5, dtype=torch.float64),))


def test_an_output_replaced_by_another_hook_is_normalised_again():
    """A forward hook of the user's that returns a new tensor (here a clone) hides the layer's
    autograd node from privgrad's hook: nothing is kept, the input is normalised again, and the
    per-sample gradients are those of the plain layer still."""
    net = model(torch.float64)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    seen = {}

    def keep(m, args, out):
        seen.update(x=args[0].detach())
        out = out.clone()
        out.register_hook(lambda g: seen.update(g=g.detach()))
        return out
    net[1].register_forward_hook(keep)
    with GroupNormForwards() as calls, PerSampleGradients(net, mode="materialize") as psg:
        net(x).square().sum().backward()
    assert calls.count == 2  # the forward, and the recomputation the kept statistics would save
    want = recomputed(net[1], seen["x"], seen["g"])
    for name in ("weight", "bias"):
        assert torch.equal(psg.gradients[f"1.{name}"], want[name])
