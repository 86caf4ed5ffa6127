"""Row 5 of PRIVACY_TESTS.md: every built-in rule's per-sample gradients, norms and weighted
sums equal the one-example references, in every engine mode, for batch sizes 0, 1 and more.

The harness is the published one, :func:`privgrad.testing.check_rule` (``check_module`` is it on
exactly the batch given: hypothesis draws the batch sizes there)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from privgrad.layers.linear import GRAM_HALVES_MIN, gram_inner, grams, linear_ghost_norm_sq
from privgrad.testing import check_rule
from tests.layers.cases import check_module

D = torch.float64


def randn(*shape):
    return torch.randn(*shape, dtype=D)


# -- Linear -----------------------------------------------------------------------------------
@given(b=st.integers(0, 4), middle=st.lists(st.integers(1, 3), max_size=2),
       d=st.integers(1, 5), p=st.integers(1, 5), bias=st.booleans())
def test_linear_any_leading_dims(b, middle, d, p, bias):
    torch.manual_seed(b * 100 + d * 10 + p)
    check_module(nn.Linear(d, p, bias=bias).double(), (randn(b, *middle, d),))


def test_linear_long_sequence_prefers_materialising_and_still_agrees():
    # T (d + p) > d p: the cost model picks materialising in "auto"; all modes agree.
    check_module(nn.Linear(2, 2).double(), (randn(3, 9, 2),))


# Gram products in halves, from GRAM_HALVES_MIN positions: the same norms as the whole matrices
@pytest.mark.parametrize("t", [GRAM_HALVES_MIN - 1, GRAM_HALVES_MIN, GRAM_HALVES_MIN + 1])
def test_gram_blocks_give_the_per_sample_norm(t):
    torch.manual_seed(t)
    a, g = randn(3, t, 4), randn(3, t, 2)
    blocks = grams(a)
    h = t // 2
    assert [x.shape[1:] for x in blocks] == (
        [(t, t)] if t < GRAM_HALVES_MIN else [(h, h), (t - h, t - h), (h, t - h)])
    per_sample = torch.einsum("bto,bti->boi", g, a).square().sum((1, 2))  # materialised
    torch.testing.assert_close(gram_inner(blocks, grams(g)), per_sample, rtol=1e-10, atol=0)
    torch.testing.assert_close(linear_ghost_norm_sq(a, g, D), per_sample, rtol=1e-10, atol=0)


@pytest.mark.parametrize("t", [GRAM_HALVES_MIN, GRAM_HALVES_MIN + 1])
def test_linear_gram_in_halves_in_every_mode(t):
    check_module(nn.Linear(3, 2).double(), (randn(2, t, 3),))


def test_convolution_gram_form_in_halves():
    # L (i + o) <= i o at L = 256 positions (i = 60 x 10, o = 600): the Gram form, in halves
    torch.manual_seed(5)
    check_module(nn.Conv1d(60, 600, 10).double(), (randn(2, 60, GRAM_HALVES_MIN + 9),))


def test_linear_partly_frozen():
    layer = nn.Linear(4, 3).double()
    layer.weight.requires_grad_(False)
    ref = check_rule(layer, (randn(5, 4),))
    assert set(ref) == {"bias"}


# -- Convolutions -----------------------------------------------------------------------------
CONV_CASES = [
    (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3), (4, 2, 9)),
    (nn.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=2, stride=2, groups=2, bias=False), (3, 4, 8)),
    (nn.Conv1d, dict(in_channels=2, out_channels=2, kernel_size=4, padding="same", dilation=2), (2, 2, 10)),
    (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="circular"), (2, 2, 7)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (3, 3, 6, 6)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2), groups=2), (2, 4, 7, 8)),
    (nn.Conv2d, dict(in_channels=2, out_channels=2, kernel_size=4, padding="same"), (2, 2, 5, 6)),
    (nn.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"), (2, 2, 5, 5)),
    (nn.Conv2d, dict(in_channels=3, out_channels=3, kernel_size=3, groups=3, padding=1, padding_mode="replicate"), (2, 3, 4, 4)),
    (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=2), (2, 2, 3, 4, 3)),
    (nn.Conv3d, dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding=1, dilation=(1, 2, 1), groups=2), (2, 2, 5, 6, 5)),
    (nn.Conv3d, dict(in_channels=1, out_channels=2, kernel_size=(3, 2, 2), padding="same"), (2, 1, 4, 4, 3)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kind,kwargs,shape", CONV_CASES,
                         ids=[f"{k.__name__}-{i}" for i, (k, _, _) in enumerate(CONV_CASES)])
def test_convolutions(kind, kwargs, shape):
    check_rule(kind(**kwargs).double(), (randn(*shape),))


# Channel counts where the CPU per-sample kernel is the grouped weight-gradient convolution
# (conv.py): the engine's results must be the same as on the unfold path.
GROUPED_KERNEL_CASES = [
    (nn.Conv2d, dict(in_channels=8, out_channels=4, kernel_size=3, padding=1), (3, 8, 5, 5)),
    (nn.Conv2d, dict(in_channels=16, out_channels=8, kernel_size=(2, 3), stride=2, dilation=(2, 1), groups=2), (2, 16, 9, 8)),
    (nn.Conv2d, dict(in_channels=8, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"), (2, 8, 4, 4)),
    (nn.Conv2d, dict(in_channels=8, out_channels=2, kernel_size=4, padding="same"), (2, 8, 5, 6)),
    (nn.Conv1d, dict(in_channels=8, out_channels=3, kernel_size=3, stride=2, padding=1), (4, 8, 9)),
    (nn.Conv3d, dict(in_channels=8, out_channels=2, kernel_size=2, padding=1), (2, 8, 3, 3, 2)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kind,kwargs,shape", GROUPED_KERNEL_CASES,
                         ids=[f"{k.__name__}-{i}" for i, (k, _, _) in enumerate(GROUPED_KERNEL_CASES)])
def test_convolutions_grouped_kernel(kind, kwargs, shape):
    from privgrad.layers.conv import _grouped_kernel_faster

    layer = kind(**kwargs).double()
    assert _grouped_kernel_faster(layer, randn(*shape))  # the case tests the path it names
    check_rule(layer, (randn(*shape),))
    check_rule(layer, (randn(*shape),), engine_dtype=torch.float32)


# Per-sample gradients larger than the call's input and output gradient, where the Gram form
# is dearer too: the norms come from chunks of per-sample gradients (conv.py), on the grouped
# kernel (8 input channels) and on the unfold path (4).
CHUNKED_CASES = [(nn.Conv2d(8, 8, 3), (4, 8, 5, 5)), (nn.Conv2d(4, 16, 3), (5, 4, 6, 6))]


@pytest.mark.parametrize("layer,shape", CHUNKED_CASES, ids=["grouped-kernel", "unfold"])
def test_convolution_norms_in_chunks(layer, shape, monkeypatch):
    import privgrad.layers.conv as conv
    from privgrad.engine import PerSampleGradients

    layer = layer.double()
    x = randn(*shape)
    with PerSampleGradients(layer, mode="auto") as psg:
        layer(x).sum().backward()
    assert set(psg.batch.methods.values()) == {"materialize"}  # small: whole is no concern
    monkeypatch.setattr(conv, "CHUNK_MIN_BYTES", 1)  # chunks of one example or a few
    with PerSampleGradients(layer, mode="auto") as psg:
        layer(x).sum().backward()
    assert set(psg.batch.methods.values()) == {"ghost"}  # whole tensors are never chosen now
    chunks = []
    forming = conv.ConvRule._per_sample_weight
    monkeypatch.setattr(conv.ConvRule, "_per_sample_weight",
                        lambda self, m, x, g: chunks.append(x.shape[0]) or forming(self, m, x, g))
    check_module(layer, (x,))
    check_module(layer, (x,), engine_dtype=torch.float32)
    assert sum(c < shape[0] for c in chunks) > 2  # ("materialize" mode forms the whole batch)


@given(b=st.integers(0, 3), c_in=st.integers(1, 3), c_out=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), size=st.integers(3, 6))
def test_conv2d_shapes(b, c_in, c_out, k, stride, size):
    check_module(nn.Conv2d(c_in, c_out, k, stride=stride).double(), (randn(b, c_in, size, size),))


# -- Embeddings -------------------------------------------------------------------------------
@given(b=st.integers(0, 4), t=st.integers(1, 6), vocab=st.integers(1, 6),
       padding=st.booleans())
def test_embedding_repeated_tokens_and_padding(b, t, vocab, padding):
    layer = nn.Embedding(vocab, 3, padding_idx=0 if padding else None).double()
    idx = torch.randint(0, vocab, (b, t))  # small vocabularies force repeated tokens
    check_module(layer, (idx,))


def test_embedding_index_shapes():
    layer = nn.Embedding(7, 2).double()
    check_module(layer, (torch.randint(0, 7, (3,)),))
    check_module(layer, (torch.randint(0, 7, (3, 2, 4)),))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding", [None, 1])
def test_embedding_bag_2d(mode, padding):
    layer = nn.EmbeddingBag(6, 3, mode=mode, padding_idx=padding).double()
    idx = torch.randint(0, 6, (4, 5))
    idx[0] = 1  # a bag made only of padding (when padding_idx=1)
    check_rule(layer, (idx,))


def bag_example(idx, offsets, weights=None):
    """Example i of a flat EmbeddingBag call = its own bag, with offsets [0]."""
    bounds = offsets.tolist() + [idx.shape[0]]

    def example(i):
        a, b = bounds[i], bounds[i + 1]
        kwargs = {"per_sample_weights": weights[a:b]} if weights is not None else {}
        return (idx[a:b], torch.tensor([0])), kwargs
    return example


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_offsets_with_empty_bags(mode):
    layer = nn.EmbeddingBag(5, 2, mode=mode).double()
    idx = torch.tensor([1, 1, 3, 4, 0, 2, 2, 2])
    offsets = torch.tensor([0, 3, 3, 6])  # bag 1 is empty
    check_module(layer, (idx, offsets), batch=4, example=bag_example(idx, offsets))


def test_embedding_bag_per_sample_weights():
    layer = nn.EmbeddingBag(5, 2, mode="sum").double()
    idx = torch.tensor([1, 1, 3, 4, 0, 2])
    offsets = torch.tensor([0, 2, 4])
    w = torch.rand(6, dtype=D)
    check_module(layer, (idx, offsets), {"per_sample_weights": w}, batch=3,
                 example=bag_example(idx, offsets, w))


def test_embedding_bag_include_last_offset():
    layer = nn.EmbeddingBag(5, 2, mode="mean", include_last_offset=True).double()
    idx = torch.tensor([1, 2, 3, 4, 4])
    offsets = torch.tensor([0, 2, 5])
    example = bag_example(idx, offsets[:-1])
    check_module(layer, (idx, offsets), batch=2,
                 example=lambda i: ((example(i)[0][0], torch.tensor([0, example(i)[0][0].shape[0]])), {}))


# -- Normalisation ----------------------------------------------------------------------------
NORM_CASES = [
    (nn.LayerNorm(4), (3, 4)),
    (nn.LayerNorm((2, 3)), (3, 5, 2, 3)),
    (nn.LayerNorm(4, bias=False), (2, 6, 4)),
    (nn.GroupNorm(2, 4), (3, 4, 5)),
    (nn.GroupNorm(3, 6), (2, 6, 3, 3)),
    (nn.InstanceNorm1d(3, affine=True), (3, 3, 7)),
    (nn.InstanceNorm2d(2, affine=True), (2, 2, 4, 4)),
    (nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 3, 3)),
    (nn.RMSNorm(5), (3, 5)),
    (nn.RMSNorm(4, eps=1e-3), (2, 3, 4)),
]


@pytest.mark.parametrize("layer,shape", NORM_CASES, ids=[repr(c[0]) for c in NORM_CASES])
@pytest.mark.parametrize("b", [0, 1, 3])
def test_norm_layers(layer, shape, b):
    if b == 0 and isinstance(layer, nn.modules.instancenorm._InstanceNorm):
        with pytest.raises(IndexError):  # torch's own InstanceNorm cannot run an empty batch
            layer(randn(0, *shape[1:]))
        return
    check_module(layer.double(), (randn(b, *shape[1:]),))


def test_group_norm_float32_channels_last_and_offset_inputs():
    # The per-sample gradients come from the layer's fused backward kernel with the batch
    # folded into the groups: a float32 engine, a non-contiguous input and inputs far from zero
    # mean (where sum(g x) - mean sum(g) cancels) still agree with float64 to 1e-5.
    layer = nn.GroupNorm(4, 8).double()
    x = randn(3, 8, 5, 5) * 0.5 + 4.0
    check_module(layer, (x,), engine_dtype=torch.float32)
    check_module(layer, (x.transpose(2, 3),))  # not contiguous


def test_instance_norm_eval_with_running_stats():
    layer = nn.InstanceNorm2d(2, affine=True, track_running_stats=True).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.3, -0.2]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5]))
    layer.eval()
    check_module(layer, (randn(3, 2, 3, 3),))


# -- Generic torch.func rule ------------------------------------------------------------------
class ScaleShift(nn.Module):
    """A custom layer with raw parameters and no dedicated rule."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x, mask=None):
        y = torch.tanh(x * self.scale + self.shift)
        return y if mask is None else y * mask


def test_generic_rule_on_custom_layer():
    check_module(ScaleShift(4).double(), (randn(5, 3, 4),))


def test_generic_rule_unbatched_keyword_input():
    # mask has no batch dimension: it is passed whole to every example
    check_module(ScaleShift(4).double(), (randn(3, 2, 4),), {"mask": randn(2, 4)})


def test_generic_rule_batch_sizes_zero_and_one():
    for b in (0, 1):
        check_module(ScaleShift(3).double(), (randn(b, 3),))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x * self.w, (x * self.w).sum(-1)


def test_generic_rule_several_outputs():
    module = TwoOutputs().double()
    x = randn(4, 3)
    r1, r2 = randn(4, 3), randn(4)

    from privgrad.engine import PerSampleGradients
    from tests.reference import assert_close, func_per_example

    def loss(i, out):
        return (out[0] * r1[i:i + 1]).sum() + (out[1] * r2[i:i + 1]).sum()

    ref = func_per_example(module, lambda i: ((x[i:i + 1],), {}), loss, 4)
    with PerSampleGradients(module) as psg:
        a, b = module(x)
        ((a * r1).sum() + (b * r2).sum()).backward()
    assert_close(psg.gradients["w"], ref["w"])


# -- Row 5 in float32: the engine in float32 against float64 references ----------------------
def _bag(mode):
    return nn.EmbeddingBag(7, 3, mode=mode)


FLOAT32_CASES = [
    ("linear-3d", lambda: nn.Linear(6, 5), lambda b: (randn(b, 4, 6),)),
    ("linear-2d", lambda: nn.Linear(8, 3), lambda b: (randn(b, 8),)),
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), lambda b: (randn(b, 3, 9),)),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), lambda b: (randn(b, 4, 7, 7),)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2), lambda b: (randn(b, 2, 3, 4, 3),)),
    ("embedding", lambda: nn.Embedding(5, 4, padding_idx=0), lambda b: (torch.randint(0, 5, (b, 6)),)),
    ("embedding-bag-mean", lambda: _bag("mean"), lambda b: (torch.randint(0, 7, (b, 5)),)),
    ("embedding-bag-sum", lambda: _bag("sum"), lambda b: (torch.randint(0, 7, (b, 5)),)),
    ("layer-norm", lambda: nn.LayerNorm(6), lambda b: (randn(b, 3, 6),)),
    ("group-norm", lambda: nn.GroupNorm(2, 4), lambda b: (randn(b, 4, 5),)),
    ("instance-norm", lambda: nn.InstanceNorm2d(3, affine=True), lambda b: (randn(b, 3, 4, 4),)),
    ("rms-norm", lambda: nn.RMSNorm(5), lambda b: (randn(b, 2, 5),)),
    ("generic", lambda: ScaleShift(4), lambda b: (randn(b, 3, 4),)),
]


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("name,build,inputs", FLOAT32_CASES, ids=[c[0] for c in FLOAT32_CASES])
def test_every_rule_in_float32_against_float64_references(name, build, inputs, b):
    torch.manual_seed(len(name) * 10 + b)
    check_module(build().double(), inputs(b), engine_dtype=torch.float32, rtol=1e-5)
