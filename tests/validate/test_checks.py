"""privgrad.validate: every finding, with its message (what is wrong, why it matters for privacy,
the fix), on the modules that should raise it and not on those that should not."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import privgrad
from privgrad import PrivacyEngine
from privgrad.errors import ModelValidationError
from privgrad.layers import RuleRegistry
from privgrad.validation import Finding


def only(model, **options) -> Finding:
    (finding,) = privgrad.validate(model, **options)
    return finding


def test_trainable_batch_norm():
    f = only(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    assert (f.path, f.module_type, f.fixable) == ("1", "BatchNorm1d", True)
    assert f.problem == "BatchNorm has trainable parameters"
    assert "statistics of the whole batch" in f.why and "GroupNorm" in f.fix
    assert str(f).startswith("1 (BatchNorm1d): BatchNorm has trainable parameters. Why: ")


def test_frozen_batch_norm_learns_in_training_mode_but_not_in_eval():
    norm = nn.BatchNorm2d(4).requires_grad_(False)
    f = only(norm)
    assert f.path == "" and str(f).startswith("<root> (BatchNorm2d)")
    assert "frozen but in training mode" in f.problem and "FrozenBatchNorm" in f.fix
    assert privgrad.validate(norm.eval()) == []


def test_batch_norm_without_running_statistics_mixes_even_in_eval():
    f = only(nn.BatchNorm1d(4, affine=False, track_running_stats=False).eval())
    assert "no running statistics" in f.problem and f.fixable


def test_instance_norm_running_statistics():
    f = only(nn.InstanceNorm1d(4, track_running_stats=True))
    assert f.problem == "InstanceNorm with track_running_stats=True in training mode"
    assert "track_running_stats=False" in f.fix
    assert privgrad.validate(nn.InstanceNorm1d(4, track_running_stats=True).eval()) == []


def test_dropout_between_recurrent_layers():
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.25)
    f = only(lstm)
    assert f.problem == "dropout=0.25 between its 2 stacked layers in training mode"
    assert "cannot be recomputed exactly" in f.why and f.fix.startswith("set dropout=0")
    assert privgrad.validate(lstm.eval()) == []
    assert privgrad.validate(nn.GRU(3, 4, num_layers=2)) == []


def test_attention_dropout():
    attention = nn.MultiheadAttention(8, 2, dropout=0.1)
    f = only(attention)
    assert f.problem == "attention dropout=0.1 in training mode" and f.fixable
    assert privgrad.validate(attention.eval()) == []


def test_sequence_first_transformer_is_one_finding_for_the_outermost_module():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = nn.Sequential(nn.Linear(8, 8), encoder)
    f = only(model)
    assert (f.path, f.module_type) == ("1", "TransformerEncoder")
    assert f.problem == "sequence-first layout (batch_first=False)" and f.fixable
    assert "take positions for examples" in f.why
    assert privgrad.validate(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)) == []


def test_sequence_first_subclass_cannot_be_fixed_automatically():
    class Mine(nn.TransformerEncoderLayer):
        pass

    f = only(Mine(8, 2, 16, dropout=0.0))
    assert not f.fixable and "batch_first=True" in f.fix


class Scaled(nn.Module):
    """Own parameter, and a dropout inside: the generic rule would have to redraw its mask."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x * self.scale)


def test_dropout_inside_a_module_served_by_the_generic_rule():
    f = only(Scaled())
    assert "generic torch.func rule" in f.problem and "(drop)" in f.problem
    assert not f.fixable and "docs/custom_layers.md" in f.fix
    assert privgrad.validate(Scaled().eval()) == []


def test_parameters_on_a_module_that_is_never_called():
    class UsesAnother(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.ParameterDict({"w": nn.Parameter(torch.ones(3))})

        def forward(self, x):
            return x * self.table["w"]

    f = only(UsesAnother())
    assert f.path == "table" and "never called" in f.problem and "noise but no signal" in f.why


def test_without_generic_rules_an_uncovered_module_is_named():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    model = nn.Sequential(nn.Linear(3, 3), Custom())
    assert privgrad.validate(model) == []  # the generic rule serves it by default
    f = only(model, rules=RuleRegistry.default().without_generic())
    assert (f.path, f.problem) == ("1", "trainable parameters with no per-sample rule")
    assert "docs/custom_layers.md" in f.fix and "requires_grad_(False)" in f.fix


def test_a_rule_refusing_a_configuration():
    f = only(nn.Embedding(5, 3, sparse=True))
    assert "sparse=True" in f.problem and "cannot be computed exactly" in f.why


def test_frozen_modules_are_not_findings():
    model = nn.Sequential(nn.LSTM(3, 4, num_layers=2, dropout=0.5), nn.BatchNorm1d(4))
    model.requires_grad_(False).eval()
    assert privgrad.validate(model) == []


def test_validate_leaves_the_model_alone_and_make_private_lists_every_finding():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4),
                          nn.InstanceNorm1d(4, track_running_stats=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(privgrad.validate(model)) == 2
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ModelValidationError, match=r"(?s)2 finding\(s\).*1 \(BatchNorm1d\).*"
                       r"3 \(InstanceNorm1d\).*privgrad.fix\(model\)") as info:
        PrivacyEngine().make_private(module=model, optimizer=optimizer, noise_multiplier=1.0,
                                     max_grad_norm=1.0,
                                     data_loader=DataLoader(TensorDataset(torch.zeros(8, 3)), batch_size=2))
    assert [f.path for f in info.value.findings] == ["1", "3"]
