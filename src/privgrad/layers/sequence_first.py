"""``torch.nn``'s transformer modules built sequence-first (``batch_first=False``): why the rules
cannot serve them as they are, and the modules ``privgrad.fix`` swaps in.

``nn.TransformerEncoderLayer``/``DecoderLayer`` (and the encoders, decoders and ``nn.Transformer``
built from them) need no rule of their own: their attention, feed-forward layers and norms have
theirs (``attention.py``, ``linear.py``, ``norm.py``). But built sequence-first they hand
``(sequence, batch, feature)`` tensors to their ``nn.Linear`` and ``nn.LayerNorm`` submodules,
whose rules take dimension 0 for the batch. The replacements take and return the same
sequence-first tensors and run batch first inside, with the same parameters and ``state_dict``
keys.

Privacy:
    A sequence-first call would give positions for examples: wrong per-sample gradients (and
    so a broken clipping bound) when the sequence length equals the batch size, an error
    otherwise. ``check_sequence_first()`` reports it (``make_private`` refuses a model with
    findings); the replacements compute exactly what the modules they replace compute.
"""

from __future__ import annotations

import torch
from torch import nn

from privgrad.layers.base import LayerFinding


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


def check_sequence_first(module: nn.Module) -> LayerFinding | None:
    """The validator's finding for a sequence-first transformer module, or ``None``."""
    if not sequence_first(module):
        return None
    fixable = type(module) in SEQUENCE_FIRST
    return LayerFinding(
        "sequence-first layout (batch_first=False)",
        "its Linear and LayerNorm submodules receive (sequence, batch, feature) tensors, so their "
        "rules would take positions for examples: wrong per-sample gradients when the sequence "
        "length equals the batch size, an error otherwise",
        ("privgrad.fix(model) swaps in a subclass that takes the same sequence-first inputs and "
         "runs batch first inside (same outputs and state_dict keys)" if fixable else
         "construct it with batch_first=True and transpose your inputs"),
        fixable=fixable)


def fix_sequence_first(module: nn.Module):
    """``(the module turned batch first inside, what it is now, why)``, or ``None``."""
    if not (sequence_first(module) and type(module) in SEQUENCE_FIRST):
        return None
    name = SEQUENCE_FIRST[type(module)].__name__
    description = f"{name} (sequence-first outside, batch first inside)"
    return make_batch_first_inside(module), description, \
        "per-sample rules need the batch in dimension 0 of every submodule's tensors"
