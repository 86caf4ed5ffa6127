"""``privgrad epsilon --report`` and ``engine.privacy_report``: the same numbers as the library."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from privgrad import cli
from privgrad.accounting import make_accountant
from privgrad.accounting.report import privacy_report

BASE = ["--dataset-size", "60000", "--batch-size", "256", "--epochs", "10", "--delta", "1e-5"]


@pytest.fixture
def run(monkeypatch, capsys):
    mine = {name: entry for name, entry in cli.SUBCOMMANDS.items() if entry[0] == "privgrad.cli.accounting"}
    monkeypatch.setattr(cli, "SUBCOMMANDS", mine)

    def _run(*argv):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def library_report(kind="pld"):
    acc = make_accountant(kind)
    acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=2340)
    return privacy_report(acc, delta=1e-5)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_report_json_is_the_librarys_report(run, kind):
    code, out, _ = run("epsilon", *BASE, "--noise-multiplier", "1.1", "--accountant", kind, "--report", "--json")
    assert code == 0
    result = json.loads(out)
    expected = library_report(kind).to_dict()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value) if not isinstance(value, list) else result[key] == value
    assert result["steps"] == 2340 and result["noise_multiplier"] == 1.1
    points = result["tradeoff"]
    assert len(points) > 100 and all(set(p) == {"fpr", "tpr"} for p in points)
    assert [p["fpr"] for p in points] == sorted(p["fpr"] for p in points)
    assert all(p["tpr"] >= p["fpr"] - 1e-12 for p in points)


def test_report_text_follows_the_plain_output(run):
    code, out, _ = run("epsilon", *BASE, "--noise-multiplier", "1.1", "--report")
    assert code == 0
    assert out.splitlines()[0].startswith("accountant") and "privacy report: 2340 steps" in out
    assert "TPR" in out and "advantage" in out and "Gaussian-DP  mu=0.234" in out


def test_report_plot_draws_the_tradeoff_curve(run, tmp_path, monkeypatch):
    import privgrad.cli.accounting as m

    drawn = []
    monkeypatch.setattr(m, "_plot", lambda *a: pytest.fail("drew epsilon against epochs"))
    original = m._plot_tradeoff
    monkeypatch.setattr(m, "_plot_tradeoff", lambda path, rep: (drawn.append(rep), original(path, rep)))
    path = tmp_path / "curve.png"
    code, out, _ = run("epsilon", *BASE, "--noise-multiplier", "1.1", "--report", "--plot", str(path), "--json")
    assert code == 0 and json.loads(out)["plot"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(drawn) == 1


def test_the_figure_touches_no_pyplot_state(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = library_report().figure()
    assert len(fig.axes) == 2 and plt.get_fignums() == before
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:2] == ["perfect privacy (FNR = 1 - FPR)", "no privacy (FNR = 0)"]
    fig.savefig(tmp_path / "curve.pdf")
    assert (tmp_path / "curve.pdf").read_bytes()[:5] == b"%PDF-"


def test_zero_noise_report_is_null_in_json(run):
    code, out, _ = run("epsilon", *BASE, "--noise-multiplier", "0", "--report", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["epsilon"] is None and result["gaussian_dp_mu"] is None and result["advantage"] == 1


def test_noise_has_no_report_flag(run, capsys):
    with pytest.raises(SystemExit) as e:
        run("noise", *BASE, "--target-epsilon", "3", "--report")
    assert e.value.code == 2


def test_report_never_imports_torch():
    code = (
        "import sys, argparse\n"
        "import privgrad.cli.accounting as m\n"
        "p = argparse.ArgumentParser(); m.add_arguments_for('epsilon', p)\n"
        "args = p.parse_args(['--dataset-size', '100', '--batch-size', '10', '--steps', '5',"
        " '--noise-multiplier', '1', '--report'])\n"
        "assert m.run_for('epsilon', args) == 0\n"
        "bad = sorted(x for x in sys.modules if x == 'torch' or x.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_engine_privacy_report_reads_its_accountant():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from privgrad import PrivacyEngine

    model = torch.nn.Linear(3, 2)
    engine = PrivacyEngine()
    before = engine.privacy_report(delta=1e-5)
    assert before.steps == 0 and before.advantage == 0
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    module, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    report = engine.privacy_report(delta=1e-5)
    assert report.steps == engine.steps == len(loader)
    assert report.epsilon == engine.get_epsilon(1e-5)
    assert report.to_dict() == privacy_report(engine.accountant, delta=1e-5).to_dict()
    assert 0 < report.advantage < 1 and not report.mu_exact
