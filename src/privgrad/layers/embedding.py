"""``nn.Embedding`` and ``nn.EmbeddingBag`` (modes ``"sum"`` and ``"mean"``).

A per-sample embedding gradient is a sparse ``V x d`` matrix: row ``v`` is the sum of the output
gradients at the positions where example ``b`` used token ``v`` (times a coefficient for bags).
Norms are computed by grouping repeated tokens of each example (``torch.unique`` over the pair
(example, token)), so no vocabulary-sized per-sample tensor is ever built; the weighted sum is a
single ``index_add`` into one ``V x d`` tensor. Materialising (research mode) builds
``(B, V, d)``, which only suits small vocabularies.

Index letters: ``b`` example, ``t`` position, ``d`` embedding feature, ``u`` distinct
(example, token) pair.
"""

from __future__ import annotations

import torch
from torch import nn

from privgrad.layers.base import Capture, LayerRule
from privgrad.layers.speed import SpeedHooks


def _grouped_norms_sq(
    example: torch.Tensor, token: torch.Tensor, rows: torch.Tensor, batch: int, vocab: int, dtype
) -> torch.Tensor:
    """``||sum over positions of rows, grouped by token||^2`` per example, shape ``(batch,)``.

    ``example``, ``token``: ``(n,)`` position owners and tokens; ``rows``: ``(n, d)``.
    """
    out = torch.zeros(batch, dtype=dtype, device=rows.device)
    if example.numel() == 0:
        return out
    keys, inverse = torch.unique(example * vocab + token, return_inverse=True)
    summed = torch.zeros(keys.shape[0], rows.shape[1], dtype=dtype, device=rows.device)
    summed.index_add_(0, inverse, rows.to(dtype))
    return out.index_add_(0, keys // vocab, summed.square().sum(1))


class EmbeddingRule(SpeedHooks, LayerRule):
    """Rule for ``nn.Embedding`` (any index shape, ``padding_idx``). ``max_norm`` is refused by
    the validator and the engine: its lookup writes the weight in place (see
    ``privgrad.validation.writers``)."""

    has_ghost_norm = True
    broadcasts_batch_of_one = True  # position embeddings: arange(T).unsqueeze(0)
    stacks_examples = True  # a sum over positions: users stack (privgrad.engine.groups)

    def check(self, module: nn.Module) -> str | None:
        if module.scale_grad_by_freq:
            return ("scale_grad_by_freq=True scales each gradient by token counts over the whole "
                    "batch, so one example's gradient depends on the others; set it to False")
        if module.sparse:
            return ("sparse=True gradients are not supported; set sparse=False (privgrad writes "
                    "a dense noisy gradient, since noise lands on every row)")
        return None

    def _positions(self, module, capture: Capture):
        idx, g = capture.activation, capture.grad_output
        b = idx.shape[0]
        token = idx.reshape(-1)
        rows = g.reshape(-1, g.shape[-1])
        example = torch.arange(b, device=idx.device).repeat_interleave(token.numel() // max(b, 1))
        if module.padding_idx is not None:
            keep = token != module.padding_idx
            token, rows, example = token[keep], rows[keep], example[keep]
        return example, token, rows

    def per_sample_gradients(self, module, capture: Capture, names):
        example, token, rows = self._positions(module, capture)
        vocab, dim = module.weight.shape
        b = capture.batch_size
        flat = torch.zeros(b * vocab, dim, dtype=rows.dtype, device=rows.device)
        flat.index_add_(0, example * vocab + token, rows)
        return {"weight": flat.view(b, vocab, dim)}

    def ghost_norms_sq(self, module, capture: Capture, names):
        example, token, rows = self._positions(module, capture)
        vocab = module.weight.shape[0]
        dtype = self.norm_dtype(rows)
        return {"weight": _grouped_norms_sq(example, token, rows, capture.batch_size, vocab, dtype)}

    def weighted_sum(self, module, capture: Capture, names, weights):
        example, token, rows = self._positions(module, capture)
        out = torch.zeros_like(module.weight, dtype=rows.dtype)
        out.index_add_(0, token, rows * weights.to(rows.dtype)[example].unsqueeze(1))
        return {"weight": out}

    def sparse_weighted_sum(self, module, capture: Capture, names, weights):
        example, token, rows = self._positions(module, capture)
        if token.numel() >= module.weight.shape[0]:
            return None  # more tokens than rows: the dense sum is smaller
        return {"weight": _rows(module, token, rows * weights.to(rows.dtype)[example].unsqueeze(1))}

    def ghost_cost(self, module, capture: Capture) -> float:
        return float(capture.grad_output.numel())

    def input_backward(self, module, args, kwargs):
        """Indices have no gradient: nothing to compute."""
        return _no_input_grad

    def materialize_cost(self, module, capture: Capture) -> float:
        return float(capture.batch_size * module.weight.numel())


class EmbeddingBagRule(SpeedHooks, LayerRule):
    """Rule for ``nn.EmbeddingBag`` with ``mode="sum"`` (optionally ``per_sample_weights``) or
    ``mode="mean"``; one bag is one example.

    Row ``v`` of bag ``b``'s gradient is ``c_bv * g_b`` where ``c_bv`` sums the coefficients of
    the bag's positions holding token ``v`` (1, the per-sample weight, or 1/bag length for mean;
    ``padding_idx`` positions count for nothing), so the squared norm is
    ``||g_b||^2 * sum_v c_bv^2``.
    """

    has_ghost_norm = True

    def check(self, module: nn.Module) -> str | None:
        if module.mode == "max":
            return ("mode='max' has no dedicated rule; use mode='sum' or 'mean', or let the "
                    "generic rule handle it")
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True mixes examples; set it to False"
        if module.sparse:
            return "sparse=True gradients are not supported; set sparse=False"
        return None

    def batch_size(self, module, args, kwargs) -> int:
        bags = _bag_layout(module, args, kwargs)
        return bags[3]

    def _coefficients(self, module, capture: Capture):
        """``(bag, token, coefficient)`` for every non-padding position."""
        token, bag, weights, _ = _bag_layout(module, capture.args, capture.kwargs)
        g = capture.grad_output
        coef = torch.ones(token.shape[0], dtype=g.dtype, device=g.device)
        if weights is not None:
            coef = weights.to(g.dtype).reshape(-1)
        keep = torch.ones_like(token, dtype=torch.bool)
        if module.padding_idx is not None:
            keep = token != module.padding_idx
        coef = coef * keep
        if module.mode == "mean":
            counts = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
            counts.index_add_(0, bag, keep.to(g.dtype))
            coef = coef / counts.clamp(min=1)[bag]
        return bag[keep], token[keep], coef[keep]

    def per_sample_gradients(self, module, capture: Capture, names):
        bag, token, coef = self._coefficients(module, capture)
        g = capture.grad_output
        vocab, dim = module.weight.shape
        b = g.shape[0]
        flat = torch.zeros(b * vocab, dim, dtype=g.dtype, device=g.device)
        flat.index_add_(0, bag * vocab + token, coef.unsqueeze(1) * g[bag])
        return {"weight": flat.view(b, vocab, dim)}

    def ghost_norms_sq(self, module, capture: Capture, names):
        bag, token, coef = self._coefficients(module, capture)
        g = capture.grad_output
        dtype = self.norm_dtype(g)
        vocab = module.weight.shape[0]
        c_sq = _grouped_norms_sq(bag, token, coef.unsqueeze(1), g.shape[0], vocab, dtype)
        return {"weight": c_sq * g.to(dtype).square().sum(1)}

    def weighted_sum(self, module, capture: Capture, names, weights):
        bag, token, coef = self._coefficients(module, capture)
        g = capture.grad_output
        out = torch.zeros_like(module.weight, dtype=g.dtype)
        scaled = (coef * weights.to(g.dtype)[bag]).unsqueeze(1) * g[bag]
        return {"weight": out.index_add_(0, token, scaled)}

    def sparse_weighted_sum(self, module, capture: Capture, names, weights):
        bag, token, coef = self._coefficients(module, capture)
        if token.numel() >= module.weight.shape[0]:
            return None  # more tokens than rows: the dense sum is smaller
        g = capture.grad_output
        return {"weight": _rows(module, token, (coef * weights.to(g.dtype)[bag]).unsqueeze(1) * g[bag])}

    def ghost_cost(self, module, capture: Capture) -> float:
        return float(capture.args[0].numel() * capture.grad_output.shape[-1])

    def input_backward(self, module, args, kwargs):
        """Indices and offsets have no gradient (a ``per_sample_weights`` that requires grad
        keeps autograd's backward: the engine does not ask then)."""
        return _no_input_grad

    def materialize_cost(self, module, capture: Capture) -> float:
        return float(capture.batch_size * module.weight.numel())


def _no_input_grad(grad_output: torch.Tensor) -> None:
    return None


def _rows(module: nn.Module, token: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values[j]`` added at row ``token[j]`` of a weight-shaped tensor, as a sparse COO tensor
    (repeated tokens stay separate entries: adding it to a dense tensor sums them)."""
    return torch.sparse_coo_tensor(token.unsqueeze(0), values, module.weight.shape,
                                   check_invariants=False)


def _bag_layout(module: nn.EmbeddingBag, args: tuple, kwargs: dict):
    """Flatten an EmbeddingBag call into ``(token, bag_of_position, per_sample_weights, bags)``."""
    names = ("input", "offsets", "per_sample_weights")
    call = dict(zip(names, args))
    call.update(kwargs)
    idx, offsets, weights = call["input"], call.get("offsets"), call.get("per_sample_weights")
    if idx.dim() == 2:
        bags, length = idx.shape
        bag = torch.arange(bags, device=idx.device).repeat_interleave(length)
        return idx.reshape(-1), bag, weights, bags
    offsets = offsets.to(torch.long)
    if module.include_last_offset:
        offsets = offsets[:-1]
    bags = offsets.shape[0]
    starts = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
    inside = offsets[offsets < idx.shape[0]]  # an offset equal to len(input) opens an empty bag
    starts.index_add_(0, inside, torch.ones_like(inside))
    bag = starts.cumsum(0) - 1  # bag of position j = number of offsets <= j, minus one
    return idx, bag, weights, bags

