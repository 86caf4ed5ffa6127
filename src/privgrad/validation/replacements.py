"""Modules that ``privgrad.fix`` swaps in for the cross-cutting fixes: each computes what the
module it replaces computes in evaluation mode, with the same ``state_dict`` keys, so a
pretrained checkpoint loads into the fixed model unchanged. (A layer family's own replacements
live beside its rule: the sequence-first transformers in ``privgrad.layers.sequence_first``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm(nn.Module):
    """Batch normalisation with fixed statistics: the evaluation-mode forward of a BatchNorm in
    every mode.

    Replaces a *frozen* ``BatchNorm1d/2d/3d`` (its affine parameters do not train): such a layer
    in training mode still normalises with batch statistics (mixing the examples) and updates
    its running statistics from private data. This one always uses the stored running
    statistics, which never change. ``state_dict`` keys are those of the BatchNorm.

    Args:
        norm: the BatchNorm to freeze (its buffers and parameters are taken over, not copied).

    Privacy:
        Each output row depends on its own input row and on fixed statistics only, and nothing
        is learnt from the data. Its parameters stay frozen; if you unfreeze them the generic
        rule computes their (exact) per-sample gradients.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.num_features, self.eps = norm.num_features, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.register_buffer("running_mean", norm.running_mean)
        self.register_buffer("running_var", norm.running_var)
        self.register_buffer("num_batches_tracked", norm.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
