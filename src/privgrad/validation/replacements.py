"""Modules that ``privgrad.fix`` swaps in: each computes what the module it replaces computes in
evaluation mode (or in every mode, for the sequence-first transformers), with the same
``state_dict`` keys, so a pretrained checkpoint loads into the fixed model unchanged.
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


def _batch_first(x):
    """``(t, b, e) -> (b, t, e)`` (and back); unbatched and absent inputs as they are."""
    return x.transpose(0, 1) if isinstance(x, torch.Tensor) and x.dim() == 3 else x


class SequenceFirstEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer(batch_first=False)`` that runs batch first inside.

    Takes and returns sequence-first tensors ``(t, b, e)`` like the original, but its
    submodules see the batch in dimension 0, which per-sample rules need (a ``nn.Linear`` given
    ``(t, b, e)`` would treat positions as examples). Masks are the same in both layouts.
    """

    def forward(self, src, *args, **kwargs):
        return _batch_first(super().forward(_batch_first(src), *args, **kwargs))


class SequenceFirstDecoderLayer(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer(batch_first=False)`` that runs batch first inside."""

    def forward(self, tgt, memory, *args, **kwargs):
        tgt, memory = _batch_first(tgt), _batch_first(memory)
        return _batch_first(super().forward(tgt, memory, *args, **kwargs))


class SequenceFirstEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` of sequence-first layers that runs batch first inside."""

    def forward(self, src, *args, **kwargs):
        return _batch_first(super().forward(_batch_first(src), *args, **kwargs))


class SequenceFirstDecoder(nn.TransformerDecoder):
    """``nn.TransformerDecoder`` of sequence-first layers that runs batch first inside."""

    def forward(self, tgt, memory, *args, **kwargs):
        tgt, memory = _batch_first(tgt), _batch_first(memory)
        return _batch_first(super().forward(tgt, memory, *args, **kwargs))


class SequenceFirstTransformer(nn.Transformer):
    """``nn.Transformer(batch_first=False)`` that runs batch first inside."""

    def forward(self, src, tgt, *args, **kwargs):
        return _batch_first(super().forward(_batch_first(src), _batch_first(tgt), *args, **kwargs))


#: exact type -> its batch-first-inside replacement
SEQUENCE_FIRST = {
    nn.TransformerEncoderLayer: SequenceFirstEncoderLayer,
    nn.TransformerDecoderLayer: SequenceFirstDecoderLayer,
    nn.TransformerEncoder: SequenceFirstEncoder,
    nn.TransformerDecoder: SequenceFirstDecoder,
    nn.Transformer: SequenceFirstTransformer,
}


def sequence_first(module: nn.Module) -> bool:
    """True for a built-in transformer module whose submodules see sequence-first tensors."""
    if isinstance(module, nn.Transformer):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return len(module.layers) > 0 and not module.layers[0].self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    return False


def make_batch_first_inside(module: nn.Module) -> nn.Module:
    """Turn ``module`` (an exact built-in transformer type) into its replacement, in place: same
    object, parameters and ``state_dict`` keys; ``batch_first`` set on it and everything inside."""
    module.__class__ = SEQUENCE_FIRST[type(module)]
    for m in module.modules():
        if hasattr(m, "batch_first"):
            m.batch_first = True
    return module
