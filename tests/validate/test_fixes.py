"""privgrad.fix: every replacement with its message; the model passed in is untouched; what is
swapped in computes what it replaces (the same outputs and state_dict keys where the issue
promises them), and the fixed model validates clean and gets exact per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import privgrad
from privgrad.validation import FrozenBatchNorm, Replacement
from privgrad.validation.fixes import group_count
from tests.layers.cases import check_module

D = torch.float64


def only(model) -> tuple[nn.Module, Replacement]:
    report = []
    fixed = privgrad.fix(model, report=report)
    (replacement,) = report
    assert privgrad.validate(fixed) == []
    return fixed, replacement


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("channels,groups", [(1, 1), (6, 6), (48, 24), (64, 32), (96, 32), (37, 1)])
def test_group_count_is_the_largest_divisor_up_to_32(channels, groups):
    assert group_count(channels) == groups


def test_trainable_batch_norm_becomes_group_norm_with_its_scale_and_shift():
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.BatchNorm2d(64))
    nn.init.normal_(model[1].weight)
    fixed, r = only(model)
    assert str(r) == "1: BatchNorm2d -> GroupNorm(32, 64) (BatchNorm mixes the examples of a batch)"
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_groups == 32
    assert torch.equal(fixed[1].weight, model[1].weight)
    assert isinstance(model[1], nn.BatchNorm2d)  # the model passed in is untouched


def test_frozen_batch_norm_becomes_its_eval_mode_forward_with_the_same_state():
    norm = nn.BatchNorm2d(4)
    with torch.no_grad():  # pretrained-looking statistics
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
    norm.requires_grad_(False)
    fixed, r = only(nn.Sequential(norm))
    assert r.old == "BatchNorm2d" and r.new.startswith("FrozenBatchNorm")
    assert "learns running statistics" in r.reason
    frozen = fixed[0]
    assert isinstance(frozen, FrozenBatchNorm) and frozen.training
    same_state(nn.Sequential(norm), fixed)
    x = torch.randn(5, 4, 3, 3)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    torch.testing.assert_close(frozen(x), norm.eval()(x), rtol=0, atol=0)
    for k, v in frozen.state_dict().items():  # training mode learns nothing
        assert torch.equal(v, before[k])
    fixed.load_state_dict(nn.Sequential(norm).state_dict())  # checkpoints load unchanged


def test_batch_norm_without_statistics_becomes_group_norm():
    fixed, r = only(nn.Sequential(nn.BatchNorm1d(6, affine=False, track_running_stats=False)))
    assert r.new == "GroupNorm(1, 6)" and not fixed[0].affine


@pytest.mark.parametrize("shape", [(5, 6), (5, 6, 7)], ids=["(N, C)", "(N, C, L)"])
def test_batch_norm_1d_becomes_a_layer_that_still_normalises(shape):
    """GroupNorm(C, C) on (N, C) normalises each feature alone: a constant output. The fix
    normalises across the features, on 2-d and 3-d inputs alike."""
    fixed, r = only(nn.Sequential(nn.BatchNorm1d(6)))
    assert r.new == "GroupNorm(1, 6)"
    x = torch.randn(*shape)
    out = fixed(x)
    assert out.std(0).min() > 0.1  # varies with the input: not a constant
    flat = out.reshape(shape[0], -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(shape[0]), atol=1e-5, rtol=0)


def test_instance_norm_stops_tracking_statistics():
    fixed, r = only(nn.Sequential(nn.InstanceNorm2d(3, affine=True, track_running_stats=True)))
    assert r.new == "InstanceNorm2d(track_running_stats=False)"
    assert r.reason == "running statistics would learn from private data"
    assert not fixed[0].track_running_stats and fixed[0].affine


def test_recurrent_dropout_is_set_to_zero_and_nothing_else_changes():
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2, dropout=0.3, batch_first=True))
    fixed, r = only(model)
    assert str(r) == ("0: GRU -> GRU(dropout=0.0) (dropout inside the recurrent kernel cannot be "
                      "reproduced for per-sample gradients)")
    same_state(model, fixed)
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(fixed.eval()(x)[0], model.eval()(x)[0], rtol=0, atol=0)
    assert model[0].dropout == 0.3


def test_attention_dropout_is_set_to_zero():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    fixed, r = only(layer)
    assert (r.path, r.new) == ("self_attn", "MultiheadAttention(dropout=0.0)")
    assert fixed.dropout.p == 0.1  # the dropout around the attention stays


def encoder(norm=True):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8) if norm else None,
                                 enable_nested_tensor=False)


SEQUENCE_FIRST = [
    pytest.param(lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0),
                 "SequenceFirstEncoderLayer", id="layer"),
    pytest.param(encoder, "SequenceFirstEncoder", id="encoder"),
    pytest.param(lambda: nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0),
                 "SequenceFirstDecoderLayer", id="decoder-layer"),
    pytest.param(lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0), 2),
                 "SequenceFirstDecoder", id="decoder"),
    # nn.Transformer builds its encoder with nested tensors on, which torch warns it cannot use
    # for a sequence-first layer: the warning is about inference speed and is torch's own.
    pytest.param(lambda: nn.Transformer(8, 2, 1, 1, 16, dropout=0.0), "SequenceFirstTransformer",
                 id="transformer", marks=pytest.mark.filterwarnings(
                     "ignore:enable_nested_tensor is True:UserWarning")),
]


@pytest.mark.parametrize("build,name", SEQUENCE_FIRST)
def test_sequence_first_transformers_run_batch_first_inside_with_the_same_outputs(build, name):
    model = build().double()
    fixed, r = only(model)
    assert r.new == f"{name} (sequence-first outside, batch first inside)" and r.path == ""
    assert type(fixed).__name__ == name and isinstance(fixed, type(model))
    same_state(model, fixed)
    x, memory = torch.randn(5, 3, 8, dtype=D), torch.randn(4, 3, 8, dtype=D)  # (t, b, e)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: may not attend
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, -1] = True
    if "Decoder" in name:
        args, kwargs = (x, memory), {"tgt_mask": causal}
    elif name == "SequenceFirstTransformer":
        args, kwargs = (memory, x), {"tgt_mask": causal}
    else:
        args, kwargs = (x,), {"mask" if name == "SequenceFirstEncoder" else "src_mask": causal,
                              "src_key_padding_mask": padding}
    torch.testing.assert_close(fixed(*args, **kwargs), model(*args, **kwargs), rtol=1e-12, atol=1e-12)


def test_fixed_sequence_first_encoder_has_exact_per_sample_gradients_when_length_equals_batch():
    # t == b: the unfixed encoder's Linear layers would silently treat positions as examples.
    fixed = privgrad.fix(encoder().double())
    x = torch.randn(4, 4, 8, dtype=D)

    class BatchFirstOut(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).transpose(0, 1)

    check_module(BatchFirstOut(fixed), (x,), batch=4, example=lambda i: ((x[:, i:i + 1],), {}))


def test_fix_repairs_everything_fixable_at_once_and_keeps_the_original():
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4), nn.Flatten(),
                          nn.LSTM(12, 4, num_layers=2, dropout=0.1))
    replacements = []
    fixed = privgrad.fix(model, report=replacements)
    assert [r.path for r in replacements] == ["1", "3"]
    assert privgrad.validate(fixed) == [] and len(privgrad.validate(model)) == 2
