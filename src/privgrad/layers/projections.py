"""Rules for layers whose parameters all enter through linear maps applied at many positions.

A recurrent layer applies ``W_ih`` to every input step and ``W_hh`` to every previous hidden state;
attention applies its packed in-projection to every query, key and value position and its output
projection to every output position. Once the rule knows, for each such map, its inputs ``a`` and
the gradient ``g`` of the loss with respect to its outputs, every per-sample quantity is the
``nn.Linear`` one (see ``linear.py``): the per-sample gradient ``g_b^T a_b``, the ghost norm
``sum_{t,s} (a_bt . a_bs)(g_bt . g_bs)`` and the weighted sum as one matrix product.

A ``ProjectionRule`` computes its list of ``Projection`` once per call (typically by
recomputing the layer's forward pass with autograd, since native kernels do not expose the
gradients inside them), keeps it in the capture's ``scratch`` and serves the norm, the weighted
sum and the per-sample gradients from it.

Index letters: ``b`` example, ``t`` position, ``i`` input feature, ``o`` output feature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from privgrad.layers.base import Capture, LayerRule
from privgrad.layers.kernels import sum_of_outer
from privgrad.layers.linear import gram_inner, grams, linear_ghost_norm_sq
from privgrad.layers.speed import SpeedHooks


@dataclass(frozen=True)
class Projection:
    """``y_bt = W a_bt + bias`` at every position ``t``, with ``g = dL/dy`` known.

    Attributes:
        g: ``(b, t, o)`` gradient of the loss with respect to the map's outputs.
        a: ``(b, t, i)`` the map's inputs (``None`` for a bias alone).
        weight: name of the weight parameter, or ``None``.
        bias: name of the bias parameter, or ``None``.

    A parameter named by several projections is made of their row blocks, in list order
    (attention's packed ``in_proj_weight``: the query, key and value blocks).
    """

    g: torch.Tensor
    a: torch.Tensor | None = None
    weight: str | None = None
    bias: str | None = None


class ProjectionRule(SpeedHooks, LayerRule):
    """A rule served by a list of ``Projection`` (subclasses implement ``compute()``)."""

    has_ghost_norm = True

    def compute(self, module, capture: Capture) -> list[Projection]:
        """The layer's linear maps for this call, batch first, in the capture's dtype."""
        raise NotImplementedError

    def projections(self, module, capture: Capture) -> list[Projection]:
        """``compute()``, once per capture."""
        return capture.kept("projections", lambda: self.compute(module, capture))

    def masked(self, capture: Capture, keep: torch.Tensor) -> Capture:
        """Dropped examples' rows of every projection set to zero (after computing them)."""
        zero = _once(lambda x: None if x is None else torch.where(
            keep.view(-1, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device)))
        kept = [replace(p, g=zero(p.g), a=zero(p.a))
                for p in self.projections(capture.module, capture)]
        return replace(capture, scratch={"projections": kept})

    # -- the three per-sample quantities ----------------------------------------------------
    # Several maps may share one output gradient (an RNN's or LSTM's gi and gh enter the gates
    # as a sum), or one input; what depends on one tensor alone is computed once per call.
    def per_sample_gradients(self, module, capture: Capture, names):
        parts: dict[str, list[torch.Tensor]] = {}
        bias_sum = _once(lambda g: g.sum(1))
        for p in self.projections(module, capture):
            if p.weight in names:
                parts.setdefault(p.weight, []).append(
                    torch.einsum("bto,bti->boi", p.g, p.a.to(p.g.dtype)))
            if p.bias in names:
                parts.setdefault(p.bias, []).append(bias_sum(p.g))
        return {n: self._assemble(module, n, blocks, batched=True) for n, blocks in parts.items()}

    def ghost_norms_sq(self, module, capture: Capture, names):
        out: dict[str, torch.Tensor] = {}
        gram = _once(lambda x, dtype: grams(x.to(dtype)))
        bias_sq = _once(lambda g, dtype: g.to(dtype).sum(1).square().sum(1))
        for p in self.projections(module, capture):
            dtype = self.norm_dtype(p.g)
            if p.weight in names:
                if p.a.shape[1] == 1:
                    sq = linear_ghost_norm_sq(p.a, p.g, dtype)
                else:  # ||g_b^T a_b||_F^2 = <a_b a_b^T, g_b g_b^T>
                    sq = gram_inner(gram(p.a, dtype), gram(p.g, dtype))
                out[p.weight] = out[p.weight] + sq if p.weight in out else sq
            if p.bias in names:
                sq = bias_sq(p.g, dtype)
                out[p.bias] = out[p.bias] + sq if p.bias in out else sq
        return out

    def weighted_sum(self, module, capture: Capture, names, weights):
        parts: dict[str, list[torch.Tensor]] = {}
        # sum_b w_b g_b^T a_b = (w g)^T a = g^T (w a): the narrower of the two is scaled (an
        # LSTM's gate gradient is 4H wide, its inputs I and H), by sum_of_outer.
        bias_sum = _once(lambda g: weights.to(g.dtype) @ g.sum(1))
        row_weights = _once(lambda w, dtype, t: w.to(dtype).repeat_interleave(t))  # (b t,)
        for p in self.projections(module, capture):
            if p.weight in names:
                g, a = p.g, p.a.to(p.g.dtype)
                rows = row_weights(weights, g.dtype, g.shape[1])
                parts.setdefault(p.weight, []).append(sum_of_outer(
                    g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1]), rows))
            if p.bias in names:
                parts.setdefault(p.bias, []).append(bias_sum(p.g))
        return {n: self._assemble(module, n, blocks, batched=False) for n, blocks in parts.items()}

    def ghost_cost(self, module, capture: Capture) -> float:
        # whole matrices, as LinearRule.ghost_cost (see privgrad/layers/linear.py)
        cost = {id(x): x.shape[0] * x.shape[1] ** 2 * x.shape[-1]
                for p in self.projections(module, capture) if p.a is not None for x in (p.a, p.g)}
        return float(sum(cost.values()))

    def materialize_cost(self, module, capture: Capture) -> float:
        return float(sum(
            p.g.shape[0] * p.g.shape[1] * p.a.shape[-1] * p.g.shape[-1]
            for p in self.projections(module, capture) if p.a is not None))

    @staticmethod
    def _assemble(module, name: str, blocks: list[torch.Tensor], *, batched: bool):
        """Row blocks of one parameter, concatenated and shaped like it (``(b, *shape)``)."""
        shape = module.get_parameter(name).shape
        whole = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1 if batched else 0)
        return whole.reshape(whole.shape[0], *shape) if batched else whole.reshape(shape)


def _once(fn):
    """``fn`` memoised on the identity of its first argument (and the other arguments)."""
    memo: dict = {}

    def call(x, *args):
        key = (id(x), *args)
        if key not in memo:
            memo[key] = (x, fn(x, *args))  # keeps x alive, so its id is not reused
        return memo[key][1]
    return call
