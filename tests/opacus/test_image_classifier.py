"""The port of Opacus's tutorial ``building_image_classifier.ipynb``
(``scripts/image_classifier.py``): validator, fix, a budget, and virtual batches."""

import pytest
import torch

import privgrad.opacus
from privgrad.errors import ModelValidationError
from tests.opacus.conftest import trained


@pytest.mark.slow
def test_image_classifier_meets_its_budget_with_physical_batches(run_script, engines, capsys):
    engines.watch(privgrad.opacus)
    g = run_script("image_classifier")
    (engine,) = engines.built
    # the validator found the three BatchNorm layers; fix replaced them and nothing is left
    assert len(g["errors"]) == 3 and all(isinstance(e, ModelValidationError) for e in g["errors"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in g["model"].modules())
    assert privgrad.opacus.ModuleValidator.is_valid(g["model"])
    # 256 images, logical batch 64: q = 1/4, 4 logical steps an epoch, 2 epochs, whatever the
    # physical batches (at most 16 examples each) were
    assert engine.accountant.history == [(g["optimizer"].noise_multiplier, 0.25, 8)]
    assert 0.9 * g["EPSILON"] < engine.get_epsilon(g["DELTA"]) <= g["EPSILON"]
    assert f"Using sigma={g['optimizer'].noise_multiplier} and C=1.2" in capsys.readouterr().out
    assert trained(engine)
    assert 0.0 <= g["top1_acc"] <= 1.0
