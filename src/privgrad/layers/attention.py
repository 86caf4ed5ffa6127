"""``nn.MultiheadAttention``: ``batch_first`` either way, separate key/value dimensions, 2-d and 3-d
``attn_mask`` (boolean or additive), ``key_padding_mask``, ``is_causal``, ``add_bias_kv``,
``add_zero_attn``, with or without returned attention weights.

Every parameter enters through a linear map applied at every position::

    q_bt = W_q x_bt + b_q     k_bs = W_k x'_bs + b_k     v_bs = W_v x''_bs + b_v
    out_bt = W_o o_bt + b_o   (o: the heads' attention output, concatenated)

(``W_q, W_k, W_v`` are the row blocks of the packed ``in_proj_weight``, or the separate
``q/k/v_proj_weight``; ``bias_k``/``bias_v`` are one extra key/value position). The module applies
``out_proj``'s parameters itself instead of calling ``out_proj``, so this rule serves them too.
It recomputes the attention from the captured inputs with autograd to get ``dL/dq``, ``dL/dk``,
``dL/dv`` and ``o``, then every per-sample quantity is the linear one over positions
(``projections.py``): ghost norms cost ``O(B T^2 E)`` instead of materialising ``B x 4E^2``.

``nn.TransformerEncoderLayer``/``DecoderLayer`` need nothing more: their feed-forward layers and
norms are ``nn.Linear``/``nn.LayerNorm`` calls with their own rules, and the dropouts between
them act on captured tensors.

Index letters (in the code's shapes): ``b`` example, ``t`` query position, ``s`` key position,
``h`` head, ``e`` feature.

Privacy:
    Exact: example ``b``'s rows depend only on its own query, key, value, masks and output
    gradients (a 3-d ``attn_mask`` is per example and head). Attention dropout in training mode
    draws a mask the recomputation cannot reproduce, so such a call is refused (the validator
    reports it; ``privgrad.fix`` sets that dropout to 0).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from privgrad.errors import UnsupportedModuleError
from privgrad.layers.base import Capture, LayerFinding
from privgrad.layers.projections import Projection, ProjectionRule

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def attention_dropout_active(module: nn.MultiheadAttention) -> bool:
    """True if the module drops attention weights at random in this mode."""
    return module.training and module.dropout > 0


def check_attention_dropout(module: nn.Module) -> LayerFinding | None:
    """The validator's finding for attention dropout in training mode, or ``None``."""
    if not (isinstance(module, nn.MultiheadAttention) and attention_dropout_active(module)):
        return None
    return LayerFinding(
        f"attention dropout={module.dropout} in training mode",
        "the mask is drawn inside the attention, so the per-sample gradients cannot be "
        "recomputed exactly and training would stop with an error at the first step",
        "set the attention's dropout to 0 (privgrad.fix(model) does this; dropout around the "
        "attention, as in nn.TransformerEncoderLayer, is unaffected and fine)",
        fixable=True)


def fix_attention_dropout(module: nn.Module):
    """``(the module with dropout=0, what it is now, why)``, or ``None``."""
    if not (isinstance(module, nn.MultiheadAttention) and attention_dropout_active(module)):
        return None
    module.dropout = 0.0
    return module, "MultiheadAttention(dropout=0.0)", \
        "dropout inside the attention cannot be reproduced for per-sample gradients"


class MultiheadAttentionRule(ProjectionRule):
    """Rule for ``nn.MultiheadAttention`` (its own parameters and ``out_proj``'s)."""

    serves_children = ("out_proj",)

    def batch_size(self, module, args, kwargs) -> int:
        query = args[0] if args else kwargs["query"]
        if query.dim() != 3:
            raise UnsupportedModuleError(
                f"MultiheadAttention needs a batch dimension (a 3-d query); got a query of shape "
                f"{tuple(query.shape)}. Add the batch dimension (query.unsqueeze("
                f"{0 if module.batch_first else 1})).")
        return int(query.shape[0] if module.batch_first else query.shape[1])

    def batch_dim(self, module) -> int | None:
        return 0 if module.batch_first else None  # attention weights are always batch first

    def compute(self, module: nn.MultiheadAttention, capture: Capture) -> list[Projection]:
        if attention_dropout_active(module):
            raise UnsupportedModuleError(
                f"MultiheadAttention with dropout={module.dropout} in training mode cannot have "
                f"exact per-sample gradients: the mask drawn inside the attention cannot be "
                f"reproduced; got dropout={module.dropout}. Set the attention dropout to 0 "
                f"(privgrad.fix(model) does this); dropout outside the attention is fine.")
        call = _SIGNATURE.bind(module, *capture.args, **capture.kwargs)
        call.apply_defaults()
        a = call.arguments
        first = (lambda x: x) if module.batch_first else (lambda x: x.transpose(0, 1))
        query, key, value = (first(a[n]).detach() for n in ("query", "key", "value"))
        grads = dict(zip(capture.output_index, capture.grad_outputs))
        g_out = first(grads[0]) if 0 in grads else torch.zeros_like(query[..., :module.embed_dim])
        g_weights = grads.get(1)

        kpm = F._canonical_mask(mask=a["key_padding_mask"], mask_name="key_padding_mask",
                                other_type=F._none_or_dtype(a["attn_mask"]),
                                other_name="attn_mask", target_type=query.dtype)
        mask = F._canonical_mask(mask=a["attn_mask"], mask_name="attn_mask", other_type=None,
                                 other_name="", target_type=query.dtype, check_other=False)
        # as F.multi_head_attention_forward: the causal hint replaces attn_mask only here
        causal = a["is_causal"] and kpm is None and not a["need_weights"]
        if causal:
            mask = None

        names, blocks = _in_projection(module)
        with torch.enable_grad():
            q, k, v = (_tracked(F.linear(x, w, b))
                       for x, (w, b) in zip((query, key, value), blocks))
            extra = []
            if module.bias_k is not None:
                extra = [_tracked(p.detach().expand(query.shape[0], 1, -1).clone())
                         for p in (module.bias_k, module.bias_v)]
            o, weights = _attend(module, q, k, v, extra, mask, kpm, causal)
            out = F.linear(o, module.out_proj.weight.detach(), _detached(module.out_proj.bias))
            loss = (out * g_out).sum()
            if g_weights is not None and a["need_weights"]:
                w = weights.mean(1) if a["average_attn_weights"] else weights
                loss = loss + (w * g_weights).sum()
            found = torch.autograd.grad(loss, [q, k, v, *extra], allow_unused=True)
        found = [g if g is not None else torch.zeros_like(t)
                 for g, t in zip(found, [q, k, v, *extra])]
        result = [Projection(g=g, a=x, weight=w, bias=b)
                  for g, x, (w, b) in zip(found[:3], (query, key, value), names)]
        if extra:
            result += [Projection(g=found[3], bias="bias_k"), Projection(g=found[4], bias="bias_v")]
        out_bias = "out_proj.bias" if module.out_proj.bias is not None else None
        result.append(Projection(g=g_out, a=o.detach(), weight="out_proj.weight", bias=out_bias))
        return result


def _detached(p):
    return None if p is None else p.detach()


def _tracked(y: torch.Tensor) -> torch.Tensor:
    return y if y.requires_grad else y.requires_grad_()


def _in_projection(module: nn.MultiheadAttention):
    """Parameter names and detached ``(weight, bias)`` of the query, key and value maps."""
    e = module.embed_dim
    bias = module.in_proj_bias
    b_name = "in_proj_bias" if bias is not None else None
    biases = [None] * 3 if bias is None else list(bias.detach().split(e))
    if module._qkv_same_embed_dim:
        weights = list(module.in_proj_weight.detach().split(e))
        names = [("in_proj_weight", b_name)] * 3
    else:
        weights = [module.get_parameter(f"{n}_proj_weight").detach() for n in "qkv"]
        names = [(f"{n}_proj_weight", b_name) for n in "qkv"]
    return names, list(zip(weights, biases))


def _attend(module, q, k, v, extra, mask, kpm, causal):
    """Heads' attention output ``o (b, t, e)`` and weights ``(b, h, t, s)`` as the module
    computes them (masks already in additive form)."""
    b, t, e = q.shape
    heads = module.num_heads
    if extra:
        k, v = torch.cat([k, extra[0]], 1), torch.cat([v, extra[1]], 1)
        mask = None if mask is None else F.pad(mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(b, 1, e)], 1)
        v = torch.cat([v, v.new_zeros(b, 1, e)], 1)
        mask = None if mask is None else F.pad(mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    s = k.shape[1]

    def split(x):  # (b, n, e) -> (b, h, n, e / h)
        return x.view(b, x.shape[1], heads, e // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(e // heads)  # (b, h, t, s)
    if mask is not None:
        scores = scores + (mask.view(b, heads, t, s) if mask.dim() == 3 and mask.shape[0] > 1
                           else mask.view(1, 1, t, s))
    if kpm is not None:
        scores = scores + kpm.view(b, 1, 1, s)
    if causal:
        allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(-1)
    o = (weights @ split(v)).transpose(1, 2).reshape(b, t, e)
    return o, weights
