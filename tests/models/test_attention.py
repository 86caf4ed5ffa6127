"""Attention: nn.MultiheadAttention in every layout and mask combination, the built-in transformer
layers, and attention written with F.scaled_dot_product_attention; per-sample gradients against
one-example references and private steps of a small transformer classifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from privgrad.engine import PerSampleGradients
from privgrad.errors import UnsupportedModuleError
from privgrad.layers.linear import GRAM_HALVES_MIN
from tests.layers.cases import check_module
from tests.models.harness import check_per_sample, check_private_step

D = torch.float64
B, T, S, E = 3, 4, 5, 8


class Attend(nn.Module):
    """Self- or cross-attention; returns the output (and the weights, when returned) batch first."""

    def __init__(self, attention: nn.MultiheadAttention, **options):
        super().__init__()
        self.attention, self.options = attention, options

    def forward(self, query, key=None, value=None, **masks):
        key = query if key is None else key
        value = key if value is None else value
        out, weights = self.attention(query, key, value, **self.options, **masks)
        if not self.attention.batch_first:
            out = out.transpose(0, 1)
        return out if weights is None else torch.cat([out.flatten(1), weights.flatten(1)], 1)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_either_layout(batch_first, need_weights):
    model = Attend(nn.MultiheadAttention(E, 2, batch_first=batch_first),
                   need_weights=need_weights).double()
    x = torch.randn(B, T, E, dtype=D)
    if batch_first:
        check_module(model, (x,))
    else:
        check_module(model, (x.transpose(0, 1),), batch=B,
                     example=lambda i: ((x[i:i + 1].transpose(0, 1),), {}))


def test_cross_attention_over_a_long_key_sequence():
    # GRAM_HALVES_MIN key positions: the key and value projections' Gram products in halves,
    # the query projection's (T positions) whole
    torch.manual_seed(3)
    model = Attend(nn.MultiheadAttention(E, 2, batch_first=True, kdim=3, vdim=6)).double()
    s = GRAM_HALVES_MIN
    q, k, v = torch.randn(B, T, E, dtype=D), torch.randn(B, s, 3, dtype=D), torch.randn(B, s, 6, dtype=D)
    check_module(model, (q, k, v))


def test_cross_attention_with_kdim_vdim_bias_kv_zero_attn_and_padding():
    model = Attend(nn.MultiheadAttention(E, 2, batch_first=True, kdim=3, vdim=6,
                                         add_bias_kv=True, add_zero_attn=True),
                   average_attn_weights=False).double()
    q, k, v = torch.randn(B, T, E, dtype=D), torch.randn(B, S, 3, dtype=D), torch.randn(B, S, 6, dtype=D)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -1] = True
    check_module(model, (q, k, v), {"key_padding_mask": padding})


def test_causal_masks_boolean_additive_and_the_hint():
    model = Attend(nn.MultiheadAttention(E, 2, batch_first=True), need_weights=False).double()
    x = torch.randn(B, T, E, dtype=D)
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=D)
    check_module(model, (x,), {"attn_mask": causal, "is_causal": True})
    check_module(model, (x,), {"attn_mask": causal.isinf()})


def test_per_example_3d_mask_with_padding():
    model = Attend(nn.MultiheadAttention(E, 2, batch_first=True), need_weights=False).double()
    x = torch.randn(B, T, E, dtype=D)
    mask = torch.randn(B * 2, T, T, dtype=D)  # one (t, t) mask per example and head
    padding = torch.zeros(B, T, dtype=D)
    padding[1, -1] = float("-inf")

    def example(i):
        return (x[i:i + 1],), {"attn_mask": mask[2 * i:2 * i + 2], "key_padding_mask": padding[i:i + 1]}

    check_module(model, (x,), {"attn_mask": mask, "key_padding_mask": padding}, batch=B,
                 example=example)


def test_frozen_projection_keeps_out_proj_covered():
    # out_proj is applied by the attention itself, never called: the attention's rule serves it.
    attention = nn.MultiheadAttention(E, 2, batch_first=True, bias=False).double()
    attention.in_proj_weight.requires_grad_(False)
    ref = check_module(Attend(attention), (torch.randn(B, T, E, dtype=D),))
    assert set(ref) == {"attention.out_proj.weight"}


def test_attention_dropout_is_refused_in_training():
    model = Attend(nn.MultiheadAttention(E, 2, dropout=0.2, batch_first=True))
    with pytest.raises(UnsupportedModuleError, match=r"dropout=0.2 in training mode.*privgrad.fix"):
        with PerSampleGradients(model):
            model(torch.randn(B, T, E)).sum().backward()


def test_unbatched_query_is_refused():
    model = Attend(nn.MultiheadAttention(E, 2))
    with pytest.raises(UnsupportedModuleError, match=r"needs a batch dimension.*unsqueeze\(1\)"):
        with PerSampleGradients(model):
            model(torch.randn(T, E)).sum().backward()


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_with_padding_and_causal_mask(norm_first):
    layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True,
                                       norm_first=norm_first).double()
    x = torch.randn(B, T, E, dtype=D)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[0, -1] = True
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True: may not attend
    check_module(layer, (x,), {"src_key_padding_mask": padding, "src_mask": causal})


def test_decoder_layer_with_memory():
    layer = nn.TransformerDecoderLayer(E, 2, 16, dropout=0.0, batch_first=True).double()
    tgt, memory = torch.randn(B, T, E, dtype=D), torch.randn(B, S, E, dtype=D)
    check_module(layer, (tgt, memory), {
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(T, dtype=D), "tgt_is_causal": True})


class SDPABlock(nn.Module):
    """Causal attention written with F.scaled_dot_product_attention and nn.Linear projections."""

    def __init__(self, width=E, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, e))


def test_scaled_dot_product_attention_block():
    check_module(SDPABlock().double(), (torch.randn(B, T, E, dtype=D),))


class TransformerClassifier(nn.Module):
    """Token and position embeddings (positions with a batch dimension of 1), two encoder layers,
    mean pooling, a linear head: the speed issue's transformer, shrunk."""

    def __init__(self, vocab=20, width=E, classes=3):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(16, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, idx, padding=None):
        positions = torch.arange(idx.shape[1]).unsqueeze(0)
        h = self.encoder(self.tokens(idx) + self.positions(positions), src_key_padding_mask=padding)
        return self.head(h.mean(1))


def classifier_case(b=4, t=6):
    model = TransformerClassifier().double()
    idx, y = torch.randint(0, 20, (b, t)), torch.randint(0, 3, (b,))
    padding = torch.zeros(b, t, dtype=torch.bool)
    padding[1, -2:] = True

    def loss(rows, logits):
        return F.cross_entropy(logits, y[rows], reduction="sum")

    def example(i):
        return (idx[i:i + 1], padding[i:i + 1]), {}

    return model, (idx, padding), {}, example, loss, b


def test_transformer_classifier_per_sample():
    check_per_sample(*classifier_case())


@pytest.mark.parametrize("mode", ["auto", "materialize"])
def test_transformer_classifier_private_step(mode):
    check_private_step(*classifier_case(), mode=mode)


@given(b=st.integers(0, 3), t=st.integers(1, 3), s=st.integers(1, 3), heads=st.sampled_from([1, 2]),
       batch_first=st.booleans(), need_weights=st.booleans())
def test_shapes_including_empty_and_single_batches(b, t, s, heads, batch_first, need_weights):
    torch.manual_seed(b * 100 + t * 10 + s)
    model = Attend(nn.MultiheadAttention(4, heads, batch_first=batch_first, kdim=3, vdim=2),
                   need_weights=need_weights).double()
    q, k, v = (torch.randn(b, n, f, dtype=D) for n, f in ((t, 4), (s, 3), (s, 2)))
    if batch_first:
        check_module(model, (q, k, v))
    else:
        first = [x.transpose(0, 1) for x in (q, k, v)]
        check_module(model, tuple(first), batch=b,
                     example=lambda i: (tuple(x[:, i:i + 1] for x in first), {}))


def _sum_loss_case(model, args, kwargs=None, b=B):
    """Loss sum(out * R) with the examples cut along the batch (first) dimension."""
    kwargs = kwargs or {}
    r = torch.randn_like(model(*args, **kwargs))

    def example(i):
        cut = lambda v: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v  # noqa: E731
        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    return model, args, kwargs, example, lambda rows, out: (out * r[rows]).sum(), b


def _mha():
    return Attend(nn.MultiheadAttention(E, 2, batch_first=True).double(), need_weights=False)


def _decoder():
    return nn.TransformerDecoderLayer(E, 2, 16, dropout=0.0, batch_first=True).double()


@pytest.mark.parametrize("build,inputs", [
    (_mha, lambda: (torch.randn(B, T, E, dtype=D),)),
    (_decoder, lambda: (torch.randn(B, T, E, dtype=D), torch.randn(B, S, E, dtype=D))),
    (lambda: SDPABlock().double(), lambda: (torch.randn(B, T, E, dtype=D),)),
], ids=["multihead-attention", "decoder-layer", "sdpa-block"])
@pytest.mark.parametrize("mode", ["auto", "materialize"])
def test_attention_private_step(build, inputs, mode):
    """sigma = 0: one private step writes exactly the clipped sum."""
    check_private_step(*_sum_loss_case(build(), inputs()), mode=mode)
