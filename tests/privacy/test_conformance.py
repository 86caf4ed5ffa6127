"""The privacy conformance rows of PRIVACY_TESTS.md that concern the core (1-4, 6, 7, 9-11;
row 5 is tests/layers, row 8 tests/sampling plus the engine's loader below)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privgrad import PrivacyEngine
from privgrad.engine import PerSampleGradients
from privgrad.errors import ModelValidationError
from tests.helpers import loader
from tests.privacy import checks

MODES = ["auto", "ghost", "materialize"]
CASES = {c.name: c for c in checks.CASES}


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_noise_is_gaussian_with_std_sigma_c(reduction):
    checks.check_noise_distribution(reduction)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_noise_lands_on_every_parameter_once(mode):
    checks.check_noise_on_every_parameter(mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_one_records_contribution_is_at_most_c(case, mode):
    checks.check_clipping_bound(CASES[case], mode)


@pytest.mark.parametrize("case", ["mlp", "conv", "tied"])
def test_per_layer_bounds_hold_layer_by_layer(case):
    checks.check_clipping_bound(CASES[case], "auto", clipping="per_layer")


@pytest.mark.parametrize("mode", ["auto", "materialize"])
@pytest.mark.parametrize("case", ["mlp", "bag", "tied"])
def test_adding_one_record_moves_the_update_by_at_most_c(case, mode):
    checks.check_add_one_sensitivity(CASES[case], mode)


# automatic clipping (C g / (||g|| + gamma)): the same bound, in every mode and layer type;
# adaptive clipping's moving bound has its own checks in tests/privatize/test_adaptive_clipping.py
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_automatic_clipping_keeps_one_record_within_c(case, mode):
    checks.check_clipping_bound(CASES[case], mode, clipping="automatic")
    checks.check_non_finite_record(CASES[case], mode, clipping="automatic")


@pytest.mark.parametrize("mode", ["auto", "materialize"])
@pytest.mark.parametrize("case", ["mlp", "bag", "tied"])
def test_automatic_clipping_add_one_sensitivity(case, mode):
    checks.check_add_one_sensitivity(CASES[case], mode, clipping="automatic")


@pytest.mark.parametrize("case", list(CASES))
def test_other_records_do_not_change_a_records_gradient(case):
    c = CASES[case]
    model = c.model().double()
    g = torch.Generator().manual_seed(0)
    x1, y1 = c.inputs(5, g)
    x2, y2 = c.inputs(5, g)
    x1, x2 = checks._cast(x1), checks._cast(x2)
    x2[0], y2[0] = x1[0], y1[0]  # record 0 is the same; the other members change
    rows = []
    for x, y in ((x1, y1), (x2, y2)):
        with PerSampleGradients(model) as psg:
            c.losses(model(x), y).sum().backward()
        rows.append({n: g[0] for n, g in psg.gradients.items()})
        model.zero_grad()
    for name in rows[0]:
        assert torch.allclose(rows[0][name], rows[1][name], rtol=1e-12, atol=1e-14), name


@pytest.mark.parametrize("frozen", [False, True])
def test_batch_norm_is_refused_even_when_frozen(frozen):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    if frozen:
        model[1].requires_grad_(False)
    with pytest.raises(ModelValidationError, match="BatchNorm"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader(torch.utils.data.TensorDataset(torch.randn(8, 3))),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_a_non_finite_record_never_makes_the_update_non_finite(case, mode):
    checks.check_non_finite_record(CASES[case], mode)


def test_a_non_finite_record_under_per_layer_clipping():
    checks.check_non_finite_record(CASES["mlp"], "auto", clipping="per_layer")


@pytest.mark.slow
def test_the_engines_loader_is_poisson():
    checks.check_engine_loader_is_poisson()


def test_calibrated_noise_meets_the_target():
    checks.check_epsilon_target()


@pytest.mark.slow
def test_empty_batches_are_noised_and_counted():
    checks.check_empty_batches_are_noised_and_counted()


def test_a_declared_private_size_changes_nothing_public():
    checks.check_size_independent()


def test_by_default_the_size_is_public_and_sets_q():
    qs = []
    for n in (200, 201):
        model = nn.Linear(3, 2)
        engine = PrivacyEngine(accountant="rdp")
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=loader(torch.utils.data.TensorDataset(torch.randn(n, 3)), 8),
                            noise_multiplier=1.0, max_grad_norm=1.0)
        qs.append(engine.settings.sample_rate)
    assert qs == [8 / 200, 8 / 201]  # documented: q = batch_size / len(dataset)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "materialize"])
def test_virtual_batches_equal_one_big_batch(mode):
    checks.check_virtual_batches(mode)
