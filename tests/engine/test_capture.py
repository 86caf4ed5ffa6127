"""The capture machinery: in-place activations, tied and reused parameters, stale forwards,
hooks that come off, and the errors for what cannot be computed."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad.engine import PerSampleGradients
from privgrad.errors import PrivacyStateError, UnsupportedModuleError
from privgrad.layers import LayerRule, RuleRegistry
from tests.helpers import drawn
from tests.layers.cases import check_module
from tests.reference import assert_close, func_per_example

D = torch.float64


def test_in_place_activations_and_residuals():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.act(self.fc1(x))
            out = self.fc2(out)
            out += x  # in-place residual on fc2's output
            return self.act(out)

    check_module(Block().double(), (torch.randn(5, 4, dtype=D),))


class Tied(nn.Module):
    """Input embedding and output projection share one weight (as GPT-2 does)."""

    def __init__(self, vocab=6, d=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def test_tied_weights_get_one_per_sample_gradient():
    model = Tied().double()
    ref = check_module(model, (torch.randint(0, 6, (4, 5)),))
    assert set(ref) == {"emb.weight", "mid.weight", "mid.bias"}  # one entry for the tied weight


def test_module_called_twice_in_one_forward():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    check_module(Twice().double(), (torch.randn(4, 3, dtype=D),))


def test_forward_without_backward_is_not_mixed_into_the_next_step():
    model = nn.Linear(3, 2).double()
    x, stale = torch.randn(4, 3, dtype=D), torch.randn(7, 3, dtype=D)
    with PerSampleGradients(model) as psg:
        model(stale)  # e.g. an evaluation forward without torch.no_grad()
        model(x).sum().backward()
    ref = func_per_example(model, lambda i: ((x[i:i + 1],), {}), lambda i, o: o.sum(), 4)
    assert_close(psg.gradients["weight"], ref["weight"])


def test_no_capture_under_no_grad_and_hooks_come_off():
    model = nn.Linear(3, 2)
    with PerSampleGradients(model) as psg:
        with torch.no_grad():
            model(torch.randn(2, 3))
    assert psg.batches == []
    assert not model._forward_hooks
    model(torch.randn(2, 3)).sum().backward()  # after the block: nothing recorded
    assert psg.batches == []


def test_mean_reduction_recovers_each_examples_own_gradient():
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    with PerSampleGradients(model, loss_reduction="mean") as psg:
        F.mse_loss(model(x), y, reduction="mean").backward()
    ref = func_per_example(model, lambda i: ((x[i:i + 1],), {}),
                           lambda i, o: F.mse_loss(o, y[i:i + 1], reduction="mean"), 5)
    assert_close(psg.gradients["weight"], ref["weight"])


def test_input_modified_in_place_after_use_is_an_error():
    model = nn.Linear(3, 2)
    model.weight.requires_grad_(False)  # only the bias trains: autograd does not save the input
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(PrivacyStateError, match="modified in place"):
        with PerSampleGradients(model):
            h = x * 1.0
            out = model(h)
            h.mul_(2)
            out.sum().backward()


class Positional(nn.Module):
    """Position embeddings looked up with a batch dimension of 1, as BERT and GPT-2 do."""

    def __init__(self, positions_first=False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(5, 3), nn.Embedding(4, 3)
        self.positions_first = positions_first

    def forward(self, idx):
        positions = torch.arange(idx.shape[1]).unsqueeze(0)  # batch dimension of 1
        if self.positions_first:
            p = self.pos(positions)
            return p + self.tok(idx)
        return self.tok(idx) + self.pos(positions)


def test_batch_of_one_broadcast_over_the_batch_gets_per_example_gradients():
    ref = check_module(Positional().double(), (torch.randint(0, 5, (3, 4)),))
    assert ref["pos.weight"].shape == (3, 4, 3)


def test_batch_of_one_before_any_batch_is_still_an_error():
    model = Positional(positions_first=True)
    with pytest.raises(PrivacyStateError, match="same number of examples"):
        with PerSampleGradients(model):
            model(torch.randint(0, 5, (3, 4))).sum().backward()


def test_generic_rule_refuses_randomness():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return F.dropout(x * self.w, 0.5, training=True)

    model = Noisy()
    with pytest.raises(UnsupportedModuleError, match="generic torch.func rule could not"):
        with PerSampleGradients(model):
            model(torch.randn(4, 3)).sum().backward()


def test_without_generic_rules_an_uncovered_layer_names_its_path_and_the_fixes():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    model = nn.Sequential(nn.Linear(3, 3), Custom())
    with pytest.raises(UnsupportedModuleError, match=r"module 1 \(Custom\).*write a rule.*freeze"):
        with PerSampleGradients(model, rules=RuleRegistry.default().without_generic()):
            model(torch.randn(2, 3)).sum().backward()


def test_custom_rule_is_used_without_touching_global_state():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return x * self.s

    class ScaleRule(LayerRule):
        calls = 0

        def per_sample_gradients(self, module, capture, names):
            ScaleRule.calls += 1
            a, g = capture.activation, capture.grad_output
            return {"s": (a * g).flatten(1).sum(1)}

    registry = RuleRegistry.default().with_rule(Scale, ScaleRule())
    check_module(Scale().double(), (torch.randn(4, 3, dtype=D),), rules=registry)
    assert ScaleRule.calls > 0
    assert Scale not in RuleRegistry.default()


def test_subclass_overriding_forward_does_not_inherit_the_rule():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) ** 2

    registry = RuleRegistry.default()
    assert registry.dedicated(Odd(2, 2)) is None  # handled by the generic rule instead
    check_module(Odd(3, 2).double(), (torch.randn(4, 3, dtype=D),))

    class Plain(nn.Linear):
        pass

    assert registry.dedicated(Plain(2, 2)) is registry.dedicated(nn.Linear(2, 2))


def test_unbatched_input_is_refused():
    with pytest.raises(UnsupportedModuleError, match="batch dimension"):
        with PerSampleGradients(nn.Linear(3, 2)) as psg:
            psg.module(torch.randn(3)).sum().backward()


class _UnusedBranch(nn.Module):
    """A trunk and a head the loss uses, and a branch (like BERT's pooler) it does not."""

    def __init__(self):
        super().__init__()
        self.trunk, self.head, self.pooler = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 4)
        self.unused = []

    def forward(self, x):
        h = self.trunk(x)
        pooled = self.pooler(h)
        self.unused.append(weakref.ref(pooled))
        return self.head(h)


def test_a_branch_the_loss_does_not_use_is_freed_after_the_step():
    """Its capture and its output's hook referred to each other through autograd's C++ side,
    which the garbage collector cannot see: every step's graph stayed alive (MiniLM's pooler
    leaked about 1.2 GB a step at batch 32)."""
    import gc

    from privgrad import PrivacyEngine

    model = _UnusedBranch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    engine = PrivacyEngine()
    _, _, _ = engine.make_private(module=model, optimizer=optimizer,
                                  data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
                                  noise_multiplier=1.0, max_grad_norm=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        drawn(engine, len(x))
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    gc.collect()
    assert len(model.unused) == 3 and all(ref() is None for ref in model.unused)
    assert model.pooler.weight.grad is not None  # still noised like every parameter


def test_a_forward_pass_without_backward_is_not_kept_alive():
    """A validation loop without torch.no_grad: each forward's graph is freed when the user
    drops its output, as without privgrad, not kept until the next backward pass."""
    import gc

    from privgrad import PrivacyEngine

    model = _UnusedBranch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
                        noise_multiplier=1.0, max_grad_norm=1.0)
    outputs = [weakref.ref(model(x)) for _ in range(5)]  # grad enabled, never backpropagated
    gc.collect()
    assert all(ref() is None for ref in outputs + model.unused)
    before = model.head.weight.detach().clone()
    optimizer.zero_grad()
    drawn(engine, len(x))
    F.cross_entropy(model(x), y).backward()  # the next step sees only its own forward
    optimizer.step()
    assert engine.last_step_stats.examples == 8 and engine.last_step_stats.backward_passes == 1
    assert not torch.equal(model.head.weight, before)
