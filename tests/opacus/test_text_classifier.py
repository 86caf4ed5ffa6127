"""The port of Opacus's tutorial ``building_text_classifier.ipynb``
(``scripts/text_classifier.py``): BERT to a budget three ways (physical batches, ghost
clipping with Opacus's four return values, LoRA), each run re-privatising the loader the last
one returned."""

import pytest

import privgrad.opacus
from privgrad.settings import PrivacyWarning
from tests.opacus.conftest import trained

pytestmark = [
    pytest.mark.slow,
    # peft calls a transformers property that transformers 5 deprecates (not privgrad)
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def test_text_classifier_three_runs_meet_the_budget(run_script, engines, monkeypatch):
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "0")  # the script sets it; restored afterwards
    engines.watch(privgrad.opacus)
    # DELTA = 1 / len(train_dataloader) = 1/4 >= 1/N: privgrad says so each time it is used
    with pytest.warns(PrivacyWarning, match="target_delta=0.25 is at least 1/N"):
        g = run_script("text_classifier")
    flat, ghost, lora = engines.built
    for engine in engines.built:  # 128 pairs, batch 32: q = 1/4, 4 steps an epoch, 3 epochs
        (entry,) = engine.accountant.history
        assert entry[1:] == (0.25, 12)
        epsilon = engine.privgrad_engine.accountant.get_epsilon(0.25)
        assert 0.9 * g["EPSILON"] < epsilon <= g["EPSILON"]
        assert trained(engine)
    assert flat.privgrad_engine.performance.grad_sample_mode == "auto"
    assert ghost.privgrad_engine.performance.grad_sample_mode == "auto"  # privgrad's ghost alias
    assert g["criterion_lora"] is g["criterion"]  # ghost mode returns the user's criterion
    assert g["model_gc"] is ghost.privgrad_engine.module  # the model itself, not a wrapper
    assert g["optimizer_gc"].original_optimizer is ghost.privgrad_engine.optimizer
    # LoRA: only the adapters and the classification head trained
    names = [n for n, p in g["model_lora"].named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n for n in names)
