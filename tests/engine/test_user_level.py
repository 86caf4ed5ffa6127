"""User-level clipping against a per-user reference loop: sum each user's per-example gradients
(one example at a time, autograd, float64), clip the sum to C, add; in every engine mode, every
layer family of the conformance cases, flat, per-layer and automatic clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.engine.groups import Units, dense_labels
from privgrad.errors import ConfigError, PrivacyStateError
from tests.privacy import checks

MODES = ["auto", "ghost", "materialize"]
C = 0.7


class Tokens(nn.Module):
    """Embedding, LayerNorm and a linear layer over positions (the stacking rules, T > 1), and
    a recurrent layer (materialised and added up by user)."""

    def __init__(self, recurrent: bool = False):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.rnn = nn.GRU(6, 6, batch_first=True) if recurrent else None
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        h = torch.tanh(self.mix(self.norm(self.emb(idx))))
        if self.rnn is not None:
            h = self.rnn(h)[0]
        return self.head(h.mean(1))


def _tokens(n, g):
    return torch.randint(0, 11, (n, 4), generator=g), torch.randint(0, 3, (n,), generator=g)


CASES = {c.name: c for c in checks.CASES}
CASES["tokens"] = checks.Case("tokens", Tokens, _tokens, checks._cls)
CASES["recurrent"] = checks.Case("recurrent", lambda: Tokens(True), _tokens, checks._cls)


def drawn_users(engine, labels) -> None:
    """Tell ``engine`` that its user-level loader drew a batch whose row ``b`` belongs to user
    ``labels[b]`` (for tests that craft their batches)."""
    engine._sampler.notes.append(np.asarray(labels, dtype=np.int64))
    engine._rows.drawn.queue(len(labels))
    engine._rows.drawn.deliver()


def attach(model, *, mode="auto", clipping="flat", sigma=0.0, k=4, users=12):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    data = TensorDataset(torch.zeros(3 * users, 1))
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(data, batch_size=8), noise_multiplier=sigma,
                        max_grad_norm=C, clipping=clipping, loss_reduction="sum",
                        grad_sample_mode=mode, privacy_unit="user",
                        user_ids=[i // 3 for i in range(3 * users)], max_examples_per_user=k)
    return optimizer, engine


def reference(model, case, x, y, weights, labels, clipping="flat", gamma=0.01):
    """``sum_u clip(sum_{b in u} g_b)``, one example at a time (on a plain copy of ``model``:
    the private one's hooks form no parameter gradients of their own)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model = _plain_copy(model, case)
    params = [model.get_parameter(n) for n in names]
    per_user = {}
    for b in range(len(x)):
        loss = (case.losses(model(x[b:b + 1]), y[b:b + 1]) * weights[b:b + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        u = int(labels[b])
        per_user[u] = grads if u not in per_user else [a + g for a, g in zip(per_user[u], grads)]
    total = [torch.zeros_like(p) for p in params]
    for grads in per_user.values():
        if clipping == "per_layer":
            each = C / math.sqrt(len(params))
            factors = [min(1.0, each / float(g.norm())) if float(g.norm()) else 1.0 for g in grads]
        else:
            norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
            factor = C / (norm + gamma) if clipping == "automatic" else (
                min(1.0, C / norm) if norm else 1.0)
            factors = [factor] * len(grads)
        total = [t + f * g for t, f, g in zip(total, factors, grads)]
    return dict(zip(names, total))


def _plain_copy(model, case):
    torch.manual_seed(0)
    plain = case.model().double()
    plain.load_state_dict(model.state_dict())
    for (_, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        q.requires_grad_(p.requires_grad)
    return plain


def release(model, optimizer, engine, case, x, y, weights, labels):
    drawn_users(engine, labels)
    optimizer.zero_grad()
    (case.losses(model(x), y) * weights).sum().backward()
    optimizer.step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# users of 1, 3 and 4 rows, not contiguous (the engine must not rely on the loader's order)
LABELS = [5, 2, 2, 9, 5, 2, 9, 9, 5, 9]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_per_user_clipping_matches_the_per_user_loop(case, mode):
    case = CASES[case]
    g = torch.Generator().manual_seed(1)
    model = case.model().double()
    optimizer, engine = attach(model, mode=mode)
    x, y = case.inputs(len(LABELS), g)
    x = x.double() if x.is_floating_point() else x
    weights = torch.linspace(0.5, 30.0, len(LABELS), dtype=torch.float64)  # some clip, some not
    # the first pass runs the self-check on autograd's backward, the second the fast paths
    for when in ("first step", "later step"):
        got = release(model, optimizer, engine, case, x, y, weights, LABELS)
        want = reference(model, case, x, y, weights, LABELS)
        assert engine.last_step_stats.examples == 3  # three users
        for n, w in want.items():
            torch.testing.assert_close(got[n], w, rtol=1e-9, atol=1e-11,
                                       msg=f"{case.name}/{mode}/{when}/{n}")


@pytest.mark.parametrize("clipping", ["per_layer", "automatic"])
@pytest.mark.parametrize("case", ["mlp", "tokens", "conv"])
def test_per_layer_and_automatic_clipping_clip_users(case, clipping):
    case = CASES[case]
    g = torch.Generator().manual_seed(2)
    model = case.model().double()
    optimizer, engine = attach(model, clipping=clipping)
    x, y = case.inputs(len(LABELS), g)
    x = x.double() if x.is_floating_point() else x
    weights = torch.linspace(0.5, 30.0, len(LABELS), dtype=torch.float64)
    got = release(model, optimizer, engine, case, x, y, weights, LABELS)
    want = reference(model, case, x, y, weights, LABELS, clipping=clipping)
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-9, atol=1e-11)


def test_a_user_of_many_huge_rows_contributes_at_most_c():
    """Row 3 with a user as the unit: a user whose rows all have huge gradients, in the same
    direction, adds at most C in total (example-level clipping would let each row add C)."""
    case = CASES["mlp"]
    g = torch.Generator().manual_seed(3)
    model = case.model().double()
    optimizer, engine = attach(model)
    x, y = case.inputs(8, g)
    x = x.double()
    x[4:] = x[4]  # user 1: four copies of one record
    y[4:] = y[4]
    labels = [0, 0, 1, 1, 1, 1, 2, 3]
    weights = torch.ones(8, dtype=torch.float64)
    weights[2:6] = 1e4
    with_user = release(model, optimizer, engine, case, x, y, weights, labels)
    keep = torch.tensor([b not in (2, 3, 4, 5) for b in range(8)])
    without = release(model, optimizer, engine, case, x[keep], y[keep], weights[keep],
                      [lab for lab, k in zip(labels, keep) if k])
    diff = math.sqrt(sum(float((with_user[n] - without[n]).square().sum()) for n in with_user))
    assert 0.99 * C <= diff <= C * (1 + 1e-9)


def test_a_non_finite_row_drops_its_whole_user():
    case = CASES["mlp"]
    g = torch.Generator().manual_seed(4)
    model = case.model().double()
    optimizer, engine = attach(model)
    x, y = case.inputs(6, g)
    x = x.double()
    labels = [0, 0, 1, 1, 2, 2]
    weights = torch.ones(6, dtype=torch.float64)
    weights[2] = float("nan")
    bad = release(model, optimizer, engine, case, x, y, weights, labels)
    assert engine.last_step_stats.dropped == 1
    keep = torch.tensor([0, 1, 4, 5])
    clean = release(model, optimizer, engine, case, x[keep], y[keep], weights[keep], [0, 0, 2, 2])
    for n in bad:
        assert torch.isfinite(bad[n]).all()
        torch.testing.assert_close(bad[n], clean[n], rtol=1e-12, atol=1e-14)


def test_virtual_batches_keep_each_user_in_one_chunk_and_equal_one_pass():
    results = []
    for physical in (None, 5):
        torch.manual_seed(7)
        x, y = torch.randn(60, 6, dtype=torch.float64), torch.randint(0, 3, (60,))
        model = CASES["mlp"].model().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine()
        torch.manual_seed(8)
        _, _, dl = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y),
                                                                      batch_size=12),
            noise_multiplier=0.0, max_grad_norm=0.05, loss_reduction="sum",
            privacy_unit="user", user_ids=[i % 15 for i in range(60)], max_examples_per_user=3)
        if physical is None:
            for xb, yb in dl:
                optimizer.zero_grad()
                checks._cls(model(xb), yb).sum().backward()
                optimizer.step()
        else:
            with engine.virtual_batches(dl, max_physical_batch_size=physical) as chunks:
                for xb, yb in chunks:
                    assert len(xb) <= physical
                    optimizer.zero_grad()
                    checks._cls(model(xb), yb).sum().backward()
                    optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
        assert engine.steps == 4  # round(45 drawable rows / 12)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_physical_batch_smaller_than_a_user_is_refused():
    model = checks.CASES[0].model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    x = torch.randn(40, 6)
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x), batch_size=20),
        noise_multiplier=1.0, max_grad_norm=1.0, privacy_unit="user",
        user_ids=[i // 4 for i in range(40)], max_examples_per_user=4)
    with (pytest.raises(ConfigError, match=r"max_physical_batch_size must hold one user's rows"),
          engine.virtual_batches(dl, max_physical_batch_size=3) as chunks):
        for (xb,) in chunks:
            optimizer.zero_grad()
            model(xb).sum().backward()
            optimizer.step()
    assert engine.steps == 0


def test_a_pass_that_splits_a_user_is_refused():
    """Row 18's pattern at user level: a loop that splits the drawn batch itself."""
    model = checks.CASES[0].model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    x = torch.randn(40, 6)
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x), batch_size=20),
        noise_multiplier=1.0, max_grad_norm=1.0, privacy_unit="user",
        user_ids=[i // 4 for i in range(40)], max_examples_per_user=4, sample_rate=1.0,
        expected_batch_size=40.0)
    (xb,) = next(iter(dl))
    optimizer.zero_grad()
    with pytest.raises(PrivacyStateError, match="splits a user's rows"):
        model(xb[:3]).sum().backward()
    assert engine.steps == 0


def test_units_stack_rows_by_user_with_zero_padding():
    units = Units.of(torch.tensor([7, 3, 7, 7, 1]))
    assert units.count == 3 and units.width == 3
    stacked = units.stack(torch.arange(1.0, 6.0))
    assert sorted(stacked.sum(1).tolist()) == [2.0, 5.0, 8.0]  # users {1}, {3}, {0, 2, 3}
    assert dense_labels(torch.tensor([], dtype=torch.int64)).numel() == 0
    empty = Units.of(torch.tensor([], dtype=torch.int64))
    assert empty.count == 0


def test_training_through_the_loader_equals_the_reference_every_step():
    """The whole path: user-level sampler, loader, engine; sigma = 0, so each step's update is
    the per-user reference on the rows the loader drew, grouped by the users it drew."""
    torch.manual_seed(5)
    n = 45
    x, y = torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,))
    user_ids = [f"user{(i * 7) % 9}" for i in range(n)]  # 9 users of 5 rows, interleaved
    case = CASES["mlp"]
    model = case.model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=9),
        noise_multiplier=0.0, max_grad_norm=C, loss_reduction="sum", privacy_unit="user",
        user_ids=user_ids, max_examples_per_user=3)
    assert engine.settings.sample_rate == pytest.approx(9 / 27)  # 9 users x min(5, 3) rows
    weights = torch.full((n,), 20.0, dtype=torch.float64)
    for step, (xb, yb, idx) in zip(range(6), checks.forever(dl)):
        labels = [user_ids[i] for i in idx.tolist()]
        per_user = {u: labels.count(u) for u in labels}
        assert all(c <= 3 for c in per_user.values())
        optimizer.zero_grad()
        (case.losses(model(xb), yb) * weights[idx]).sum().backward()
        optimizer.step()
        got = {name: p.grad.clone() for name, p in model.named_parameters()}
        codes = torch.tensor([int(u[4:]) for u in labels])
        want = reference(model, case, xb, yb, weights[idx], codes)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11)


def test_mean_loss_is_scaled_by_rows_and_normalised_by_expected_rows():
    torch.manual_seed(6)
    x = torch.randn(30, 6, dtype=torch.float64)
    model = CASES["mlp"].model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x), batch_size=6),
        noise_multiplier=0.0, max_grad_norm=1e6, privacy_unit="user",
        user_ids=[i // 2 for i in range(30)], max_examples_per_user=2)
    assert engine.normaliser() == 6.0
    (xb,) = next(iter(dl))
    optimizer.zero_grad()
    model(xb).sum(1).mean().backward()
    optimizer.step()
    got = model[0].weight.grad.clone()
    copy = _plain_copy(model, CASES["mlp"])
    plain = torch.autograd.grad(copy(xb).sum(), copy[0].weight)[0]  # unclipped sum
    torch.testing.assert_close(got, plain / 6.0)


def test_a_loss_on_the_wrong_batch_is_refused_under_user_level():
    model = CASES["mlp"].model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    x = torch.randn(40, 6)
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x), batch_size=20),
        noise_multiplier=1.0, max_grad_norm=1.0, privacy_unit="user",
        user_ids=[i // 4 for i in range(40)], max_examples_per_user=4, sample_rate=0.5,
        expected_batch_size=20.0)
    batches = iter(dl)
    (first,) = next(batches)
    next(batches)  # read ahead: the engine now sees batch 2 as the latest
    optimizer.zero_grad()
    with pytest.raises(PrivacyStateError, match="reads batches ahead or skips one"):
        F.mse_loss(model(first), torch.zeros(len(first), 3)).backward()
    assert engine.steps == 0
