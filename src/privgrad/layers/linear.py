"""``nn.Linear`` with any number of leading dimensions (and layers that compute ``x @ W.T + b``).

Index letters: ``b`` example, ``t`` position (all middle dimensions flattened into one),
``i`` input feature (d), ``o`` output feature (p).

Per-sample gradient of the weight: ``G_b^T A_b`` (``o x i``), of the bias: ``sum_t G_bt``.
Ghost norm (Li et al. 2022): ``||G_b^T A_b||_F^2 = sum_{t,s} (A_bt . A_bs)(G_bt . G_bs)``, about
``B T^2 (d + p)`` multiply-adds against ``B T d p`` for materialising, so ghost wins when
``T (d + p) < d p``; with ``T = 1`` it is just ``||a_b||^2 ||g_b||^2``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from privgrad.layers.base import Capture, LayerRule, batched_size
from privgrad.layers.kernels import linear, sum_of_outer


def positions(x: torch.Tensor) -> torch.Tensor:
    """``(b, ..., f) -> (b, t, f)``: all middle dimensions become one (works for b = 0)."""
    return x.flatten(1, -2) if x.dim() > 2 else x.unsqueeze(1)


def _flat(capture: Capture) -> tuple[torch.Tensor, torch.Tensor]:
    return positions(capture.activation), positions(capture.grad_output)


def linear_ghost_norm_sq(a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||g_b^T a_b||_F^2`` for ``a: (b, t, i)``, ``g: (b, t, o)``, in ``dtype``."""
    a, g = _as(a, dtype), _as(g, dtype)
    if a.shape[1] == 1:  # ||a_b||^2 ||g_b||^2
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class LinearRule(LayerRule):
    """Rule for ``nn.Linear``: ``y = x W^T + b`` over the last dimension of ``x``."""

    materializes_early = True

    has_ghost_norm = True
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
            g_sq = _as(g, dtype).square().sum(1)
            if self.weight_name in names:
                out[self.weight_name] = _as(a, dtype).square().sum(1) * g_sq
            if self.bias_name in names:
                out[self.bias_name] = g_sq
            return out
        a, g = positions(a), positions(g)
        if self.weight_name in names:
            out[self.weight_name] = linear_ghost_norm_sq(a, g, dtype)
        if self.bias_name in names:
            out[self.bias_name] = _as(g, dtype).sum(1).square().sum(1)
        return out

    def weighted_sum(self, module: nn.Module, capture: Capture, names, weights):
        a, g = capture.activation, capture.grad_output
        a, w = _as(a, g.dtype), _as(weights, g.dtype)
        if a.dim() > 2:
            a, g = positions(a), positions(g)  # (b, t, i), (b, t, o)
        out = {}
        if self.weight_name in names:  # one GEMM over (b, t); the narrower side is scaled
            rows = w if a.dim() == 2 else w.repeat_interleave(a.shape[1])
            out[self.weight_name] = self._orient(sum_of_outer(
                g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1]), rows))
        if self.bias_name in names:
            out[self.bias_name] = w @ (g if g.dim() == 2 else g.sum(1))
        return out

    def ghost_cost(self, module: nn.Module, capture: Capture) -> float:
        b, t = capture.batch_size, _positions(capture)
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
