"""The self-check (row 19): per-sample gradients must add up to autograd's gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.engine.selfcheck import _distance, _sparse_norms
from privgrad.errors import PrivacyStateError
from privgrad.layers import RuleRegistry
from privgrad.layers.linear import LinearRule
from tests.helpers import drawn


def test_sparse_norms_equal_the_dense_ones():
    g = torch.randn(50, 4, dtype=torch.float64)
    rows = torch.tensor([3, 7, 3, 20])  # a repeated row: entries add up
    s = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(4, 4, dtype=torch.float64),
                                (50, 4), check_invariants=True)
    dense = s.to_dense()
    expected = [g.norm(), dense.norm(), (dense - g).norm()]
    torch.testing.assert_close(_sparse_norms(s, g, chunk=16), torch.stack(expected))


def test_distance_in_pieces_equals_the_whole():
    a, b = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(_distance(a, b, chunk=64), (a - b).norm())


class Scaled(LinearRule):
    """A rule 1% off: the kind of bug the check must catch."""

    def per_sample_gradients(self, module, capture, names):
        return {n: 1.01 * g for n, g in super().per_sample_gradients(module, capture, names).items()}

    has_ghost_norm = False


@pytest.mark.parametrize("every_step", [False, True])
def test_a_rule_one_percent_off_is_refused_naming_the_parameter(every_step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    rules = RuleRegistry.default().with_rule(nn.Linear, Scaled())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=1e6,
                        rules=rules, check="every_step" if every_step else "first_step",
                        data_loader=DataLoader(TensorDataset(torch.randn(16, 3)), batch_size=8))
    drawn(engine, 8)
    with pytest.raises(PrivacyStateError, match=r"4 parameter\(s\) that do not: 0\.weight \(relative difference"):
        model(torch.randn(8, 3)).sum().backward()
    assert engine.steps == 0


def test_every_step_keeps_checking_and_first_step_stops():
    for check, expected in (("first_step", [True, False, False]),
                            ("every_step", [True, True, True])):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine()
        _, _, dl = engine.make_private(
            module=model, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0, check=check,
            data_loader=DataLoader(TensorDataset(torch.randn(32, 3)), batch_size=8))
        seen = []
        for (x,), _ in zip(dl, range(3)):
            out = model(x).sum()
            seen.append(engine._recorder.checking)  # this pass runs autograd's own backward
            out.backward()
            opt.step()
        assert seen == expected, (check, seen)


def test_a_bad_check_argument_names_the_choices():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="check must be one of 'first_step', 'every_step'"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4),
            noise_multiplier=1.0, max_grad_norm=1.0, check="never")
