"""``nn.Linear`` with any number of leading dimensions (and layers that compute ``x @ W.T + b``).

Index letters: ``b`` example, ``t`` position (all middle dimensions flattened into one),
``i`` input feature (d), ``o`` output feature (p).

Per-sample gradient of the weight: ``G_b^T A_b`` (``o x i``), of the bias: ``sum_t G_bt``.
Ghost norm (Li et al. 2022): ``||G_b^T A_b||_F^2 = sum_{t,s} (A_bt . A_bs)(G_bt . G_bs)``, about
``B T^2 (d + p)`` multiply-adds against ``B T d p`` for materialising, so ghost wins when
``T (d + p) < d p``; with ``T = 1`` it is just ``||a_b||^2 ||g_b||^2``.

Both Gram matrices are symmetric, so from ``GRAM_HALVES_MIN`` positions on they are formed
in halves of the sequence: the two diagonal blocks and one off-diagonal block, whose term counts
twice. That is 3/4 of the multiply-adds of the whole matrices.

The cost model still compares ``T^2 (d + p)`` with ``T d p``, that is the per-sample gradients
(``d p`` numbers an example) with what the capture holds (``T (d + p)``): where they are no
larger, materialising them early costs no memory and no more arithmetic than the ghost norm,
halves or not, since the clipped sum is then read off them instead of being one more
contraction of ``T d p`` (measured: letting the halves' 3/4 into the comparison turned a
width-768 transformer's feed-forward layers at 512 positions to the ghost norm, and its step
took 1.07x as long). The halves make the ghost norm cheaper where it is chosen for memory.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from privgrad.layers.base import Capture, LayerRule, batched_size
from privgrad.layers.kernels import linear, sum_of_outer
from privgrad.layers.speed import SpeedHooks


def positions(x: torch.Tensor) -> torch.Tensor:
    """``(b, ..., f) -> (b, t, f)``: all middle dimensions become one (works for b = 0)."""
    return x.flatten(1, -2) if x.dim() > 2 else x.unsqueeze(1)


def _flat(capture: Capture) -> tuple[torch.Tensor, torch.Tensor]:
    return positions(capture.activation), positions(capture.grad_output)


#: Positions from which the Gram products of a ghost norm are formed in halves. Measured on
#: 2 CPU cores (float32, both products and the contraction; benchmarks/ghost_norms.py), halves
#: against whole matrices: 0.77-0.82 of the time at 256-1,024 positions (widths 256-3,072);
#: at 128 positions 0.87-1.02, no clear gain, so whole there.
GRAM_HALVES_MIN = 256


def grams(x: torch.Tensor) -> list[torch.Tensor]:
    """The blocks of the Gram matrices ``x_b x_b^T`` of ``x: (b, t, f)`` that
    ``gram_inner()`` needs: the whole ``(b, t, t)`` below ``GRAM_HALVES_MIN`` positions,
    else the two diagonal blocks of the halves and the upper off-diagonal one."""
    t = x.shape[1]
    if t < GRAM_HALVES_MIN:
        return [torch.bmm(x, x.transpose(1, 2))]
    h = t // 2
    first, second = x[:, :h], x[:, h:]
    return [torch.bmm(first, first.transpose(1, 2)), torch.bmm(second, second.transpose(1, 2)),
            torch.bmm(first, second.transpose(1, 2))]


def gram_inner(ga: list[torch.Tensor], gg: list[torch.Tensor]) -> torch.Tensor:
    """``sum_{t,s} (a_bt . a_bs)(g_bt . g_bs)`` per example from ``grams()`` of ``a`` and
    ``g`` (the off-diagonal block stands for its transpose as well)."""
    total = (ga[0] * gg[0]).sum((1, 2))
    if len(ga) == 3:
        total = total + (ga[1] * gg[1]).sum((1, 2)) + 2 * (ga[2] * gg[2]).sum((1, 2))
    return total


def linear_ghost_norm_sq(a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||g_b^T a_b||_F^2`` for ``a: (b, t, i)``, ``g: (b, t, o)``, in ``dtype``."""
    a, g = _as(a, dtype), _as(g, dtype)
    if a.shape[1] == 1:  # ||a_b||^2 ||g_b||^2
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    return gram_inner(grams(a), grams(g))


def _row_norms_sq(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||x_b||^2`` of the rows of ``x: (b, f)``, in ``dtype``: one reduction, without the
    ``(b, f)`` temporary of ``x.square().sum(1)``."""
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype).square_()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class LinearRule(SpeedHooks, LayerRule):
    """Rule for ``nn.Linear``: ``y = x W^T + b`` over the last dimension of ``x``."""

    materializes_early = True

    has_ghost_norm = True
    stacks_examples = True  # a sum over positions: users stack (privgrad.engine.groups)
    weight_name = "weight"
    bias_name = "bias"

    def batch_size(self, module, args, kwargs) -> int:
        return batched_size(module, args[0], 2)

    def per_sample_gradients(self, module: nn.Module, capture: Capture, names):
        a, g = _flat(capture)
        out = {}
        if self.weight_name in names:
            out[self.weight_name] = self._orient(torch.einsum("bto,bti->boi", g, a.to(g.dtype)))
        if self.bias_name in names:
            out[self.bias_name] = g.sum(1)
        return out

    def ghost_norms_sq(self, module: nn.Module, capture: Capture, names):
        a, g = capture.activation, capture.grad_output
        dtype = self.norm_dtype(g)
        out = {}
        if a.dim() == 2:  # one position per example: ||g_b a_b^T||^2 = ||a_b||^2 ||g_b||^2
            g_sq = _row_norms_sq(g, dtype)
            if self.weight_name in names:
                out[self.weight_name] = _row_norms_sq(a, dtype).mul_(g_sq)
            if self.bias_name in names:
                out[self.bias_name] = g_sq
            return out
        a, g = positions(a), positions(g)
        if self.weight_name in names:
            out[self.weight_name] = linear_ghost_norm_sq(a, g, dtype)
        if self.bias_name in names:
            out[self.bias_name] = self._bias_rows(capture, g).square().sum(1)
        return out

    def weighted_sum(self, module: nn.Module, capture: Capture, names, weights):
        a, g = capture.activation, capture.grad_output
        a, w = _as(a, g.dtype), _as(weights, g.dtype)
        out = {}
        if a.dim() == 2:  # one position per example (an MLP, a head): nothing to reshape
            if self.weight_name in names:
                out[self.weight_name] = self._orient(sum_of_outer(g, a, w))
            if self.bias_name in names:
                out[self.bias_name] = w @ g
            return out
        a, g = positions(a), positions(g)  # (b, t, i), (b, t, o)
        if self.weight_name in names:  # one GEMM over (b, t); the narrower side is scaled
            out[self.weight_name] = self._orient(sum_of_outer(
                g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1]),
                w.repeat_interleave(a.shape[1])))
        if self.bias_name in names:
            out[self.bias_name] = w @ self._bias_rows(capture, g).to(g.dtype)
        return out

    def _bias_rows(self, capture: Capture, g: torch.Tensor) -> torch.Tensor:
        """Per-sample bias gradients ``sum_t G_bt`` of ``g: (b, t, o)``, in the norm dtype, formed
        once a call: the ghost norm and the weighted sum both read them."""
        return capture.kept("bias_rows", lambda: _as(g, self.norm_dtype(g)).sum(1))

    def ghost_cost(self, module: nn.Module, capture: Capture) -> float:
        b, t = capture.batch_size, _positions(capture)  # whole matrices: see the module docstring
        return float(b * t * t * (capture.activation.shape[-1] + capture.grad_output.shape[-1]))

    def materialize_cost(self, module: nn.Module, capture: Capture) -> float:
        b, t = capture.batch_size, _positions(capture)
        return float(b * t * capture.activation.shape[-1] * capture.grad_output.shape[-1])

    def input_backward(self, module: nn.Module, args, kwargs):
        """``grad_x = G W`` (``o`` contracted), for ``nn.Linear`` and subclasses with its forward."""
        if not isinstance(module, nn.Linear) or kwargs or len(args) != 1:
            return None
        return partial(_linear_input_grad, module.weight, args[0].dtype)

    def _orient(self, w: torch.Tensor) -> torch.Tensor:
        """Weight gradient in the parameter's own layout (``o x i`` for ``nn.Linear``)."""
        return w


def _linear_input_grad(weight: torch.Tensor, dtype: torch.dtype, g: torch.Tensor) -> torch.Tensor:
    """Gradient of ``x`` for ``y = x W^T + b``: ``G W`` (in the output gradient's dtype, as
    autograd computes it under autocast, then in the input's dtype)."""
    return linear(g, weight.to(g.dtype).t()).to(dtype)


def _positions(capture: Capture) -> int:
    a = capture.activation
    return math.prod(a.shape[1:-1]) if a.shape[0] else 0
