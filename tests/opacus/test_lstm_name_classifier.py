"""The port of Opacus's tutorial ``building_lstm_name_classifier.ipynb``
(``scripts/lstm_name_classifier.py``): a ``DPLSTM`` classifier trained to a budget."""

import pytest

import privgrad.opacus
from tests.opacus.conftest import trained
from tests.opacus.test_char_lstm import write_names

# the tutorial's float(loss) on a tensor that requires grad: PyTorch 2.13 warns (not privgrad)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")


@pytest.mark.slow
def test_lstm_name_classifier_meets_its_budget(run_script, engines, tmp_path, capsys):
    engines.watch(privgrad.opacus)
    g = run_script("lstm_name_classifier", [str(write_names(tmp_path / "names"))])
    (engine,) = engines.built
    # 120 training names, batch 30: q = 1/4, 4 steps an epoch, 2 epochs
    assert engine.accountant.history == [(g["optimizer"].noise_multiplier, 0.25, 8)]
    assert 0.9 * g["epsilon"] < engine.get_epsilon(g["delta"]) <= g["epsilon"]
    assert engine.privgrad_engine.layer_rules["lstm"] == "RecurrentRule"
    assert trained(engine)
    assert capsys.readouterr().out.count("ε = ") == 4  # two epochs, two evaluations
