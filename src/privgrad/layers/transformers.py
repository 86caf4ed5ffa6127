"""Rules for the layer types of Hugging Face ``transformers`` that are not ``torch.nn`` types.

Nothing here imports ``transformers``: the registry keys these rules by qualified class name, and
the rules only read the modules' attributes. Everything else in those models (``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``, ``nn.Conv2d``) has its own rule, so their attention modules,
whose masking code ``torch.func.vmap`` cannot trace, never need the generic rule.

- ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored as ``(in, out)``, the transpose of
  ``nn.Linear``'s layout; the Linear rule with the weight gradient transposed back.
- RMS norms (``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm`` and their copies): the weight
  multiplies the normalised input, ``y = n(x) * (c + w)``, so ``dL/dw_b = sum over positions of
  G_b * n(x_b)``. ``n(x)`` is taken from the module's own forward with the weight set to the value
  that makes the factor 1 (``w = 1`` for ``c = 0``, ``w = 0`` for Gemma's ``c = 1``), so every
  variant's dtype handling is reproduced exactly.

Index letters: ``b`` example; all other dimensions but the last are positions, summed over.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from privgrad.layers.base import Capture, LayerRule, batched_size
from privgrad.layers.linear import LinearRule


class TransposedLinearRule(LinearRule):
    """Rule for layers computing ``x @ W + b`` with ``W`` of shape ``(in, out)`` (GPT-2 Conv1D)."""

    def _orient(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(-1, -2)


class NeutralWeightNormRule(LayerRule):
    """Rule for a norm whose only parameter ``weight`` scales the normalised input elementwise.

    Args:
        neutral: the weight value at which the module returns the normalised input itself
            (1.0 for ``weight * n``, 0.0 for ``(1 + weight) * n``).
    """

    def __init__(self, neutral: float):
        self.neutral = float(neutral)

    def batch_size(self, module, args, kwargs) -> int:
        return batched_size(module, args[0], 2)

    def per_sample_gradients(self, module, capture: Capture, names):
        g = capture.grad_output
        neutral = torch.full_like(module.weight, self.neutral)
        with torch.no_grad():
            n = functional_call(module, {"weight": neutral}, capture.args, capture.kwargs)
        prod = g * n.to(g.dtype)
        return {"weight": prod.flatten(1, -2).sum(1) if prod.dim() > 2 else prod}
