"""``privgrad epsilon`` and ``privgrad noise``: output, errors, plot, and no torch."""

from __future__ import annotations

import builtins
import json
import re
import subprocess
import sys

import pytest

from privgrad import cli
from privgrad._install import install_hint
from privgrad.accounting import epsilon_for

BASE = ["--dataset-size", "60000", "--batch-size", "256", "--epochs", "10", "--delta", "1e-5"]


@pytest.fixture
def run(monkeypatch, capsys):
    """Run the real ``privgrad`` entry point with only this issue's subcommands registered."""
    mine = {name: entry for name, entry in cli.SUBCOMMANDS.items() if entry[0] == "privgrad.cli.accounting"}
    monkeypatch.setattr(cli, "SUBCOMMANDS", mine)

    def _run(*argv):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_both_subcommands_are_registered():
    assert cli.SUBCOMMANDS["epsilon"][0] == "privgrad.cli.accounting"
    assert cli.SUBCOMMANDS["noise"][0] == "privgrad.cli.accounting"


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_json_matches_library(run, accountant):
    code, out, _ = run("epsilon", *BASE, "--noise-multiplier", "1.1", "--accountant", accountant, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["steps"] == 2340  # 10 epochs of round(60000 / 256) = 234 steps, as the loader
    assert result["sample_rate"] == pytest.approx(256 / 60000)
    expected = epsilon_for(noise_multiplier=1.1, sample_rate=256 / 60000, steps=2340, delta=1e-5, accountant=accountant)
    assert result["epsilon"] == expected
    assert result["accountant"] == accountant


def test_epsilon_text_output(run):
    code, out, _ = run("epsilon", *BASE, "--noise-multiplier", "1.1")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["accountant"] == "pld"
    assert lines["steps"] == "2340"
    assert float(lines["epsilon"]) == pytest.approx(
        epsilon_for(noise_multiplier=1.1, sample_rate=256 / 60000, steps=2340, delta=1e-5), rel=1e-5
    )


@pytest.mark.parametrize("n,b", [(1437, 256), (60000, 256), (1000, 3)])
def test_cli_counts_the_steps_the_engine_takes(run, n, b):
    """Planning with ``privgrad epsilon`` must give the epsilon the same epochs really spend."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from privgrad import PrivacyEngine

    model = torch.nn.Linear(2, 2)
    engine = PrivacyEngine(accountant="rdp")
    _, _, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.zeros(n, 2)), batch_size=b),
        noise_multiplier=1.0, max_grad_norm=1.0)
    code, out, _ = run("epsilon", "--dataset-size", str(n), "--batch-size", str(b), "--epochs", "3",
                       "--noise-multiplier", "1.0", "--accountant", "rdp", "--json")
    assert code == 0
    assert json.loads(out)["steps"] == 3 * len(loader)
    engine.accountant.step(noise_multiplier=1.0, sample_rate=b / n, num_steps=3 * len(loader))
    assert json.loads(out)["epsilon"] == pytest.approx(engine.get_epsilon(delta=1e-5), rel=1e-9)


def test_noise_meets_target(run):
    code, out, _ = run("noise", "--dataset-size", "60000", "--batch-size", "256", "--steps", "500",
                       "--target-epsilon", "3", "--accountant", "rdp", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["steps"] == 500
    assert 0 < result["epsilon"] <= 3.0
    assert epsilon_for(noise_multiplier=result["noise_multiplier"] / 1.005, sample_rate=256 / 60000, steps=500,
                       delta=1e-5, accountant="rdp") > 3.0


def test_zero_noise_is_infinite_and_null_in_json(run):
    code, out, _ = run("epsilon", *BASE, "--noise-multiplier", "0", "--json")
    assert code == 0
    assert json.loads(out)["epsilon"] is None
    code, out, _ = run("epsilon", *BASE, "--noise-multiplier", "0")
    assert out.strip().splitlines()[-1].split() == ["epsilon", "inf"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["epsilon", *BASE, "--noise-multiplier", "-1"], "noise_multiplier must be finite and >= 0; got noise_multiplier=-1.0."),
        (["epsilon", "--dataset-size", "0", "--batch-size", "1", "--steps", "3", "--noise-multiplier", "1"], "dataset_size must be >= 1; got dataset_size=0."),
        (["epsilon", "--dataset-size", "10", "--batch-size", "20", "--steps", "3", "--noise-multiplier", "1"], "batch_size must be <= dataset_size; got batch_size=20."),
        (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "2"], r"delta must be in (0, 1); got delta=2.0."),
        (["noise", *BASE, "--target-epsilon", "0"], "target_epsilon must be > 0 and finite; got target_epsilon=0.0."),
        (["noise", *BASE, "--target-epsilon", "1e-7", "--delta", "1e-9"], "target_epsilon must be reachable with noise_multiplier <= 10000"),
    ],
)
def test_bad_input_is_one_line_and_status_2(run, argv, message):
    code, out, err = run(*argv)
    assert code == 2
    assert out == ""
    assert err.startswith(f"privgrad {argv[0]}: error: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_missing_length_is_an_argparse_error(run):
    with pytest.raises(SystemExit) as info:
        run("epsilon", "--dataset-size", "100", "--batch-size", "10", "--noise-multiplier", "1")
    assert info.value.code == 2


def test_plot_writes_a_png(run, tmp_path):
    path = tmp_path / "eps.png"
    code, out, _ = run("epsilon", "--dataset-size", "1000", "--batch-size", "50", "--epochs", "3",
                       "--noise-multiplier", "1.0", "--plot", str(path), "--json")
    assert code == 0
    assert json.loads(out)["plot"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(run, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, out, err = run("epsilon", *BASE, "--noise-multiplier", "1", "--plot", str(tmp_path / "x.png"))
    assert code == 2
    assert f"Install the plot extra: {install_hint('plot')}." in err
    assert not (tmp_path / "x.png").exists()


def test_plot_into_a_missing_folder_creates_it(run, tmp_path):
    path = tmp_path / "runs" / "new" / "eps.pdf"
    code, _, _ = run("epsilon", "--dataset-size", "1000", "--batch-size", "50", "--steps", "20",
                     "--noise-multiplier", "1.0", "--plot", str(path), "--json")
    assert code == 0
    assert path.read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("plot, message", [
    ("{tmp}/eps.txt", r"plot must end in a format matplotlib writes \(.*\.png.*\); got plot='{tmp}/eps.txt'\. Pass e\.g\. eps\.png"),
    ("{tmp}/file/eps.png", r"plot must lie in a folder; got plot='{tmp}/file/eps.png', where {tmp}/file is a file\. Pass a path"),
    ("{tmp}/folder.png", r"plot must name a file; got plot='{tmp}/folder.png', a folder\. Pass e\.g\. {tmp}/folder.png/eps.png"),
])
def test_a_bad_plot_path_is_one_line_before_any_accounting(run, tmp_path, monkeypatch, plot, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.png").mkdir()
    monkeypatch.setattr("privgrad.accounting.epsilon_for", lambda **kw: pytest.fail("accounting ran first"))
    code, out, err = run("epsilon", *BASE, "--noise-multiplier", "1", "--plot", plot.format(tmp=tmp_path))
    assert code == 2 and out == ""
    assert re.fullmatch(f"privgrad epsilon: error: {message.format(tmp=re.escape(str(tmp_path)))}.*\n", err)


@pytest.mark.parametrize("argv", [
    ["noise", *BASE, "--target-epsilon", "1e-5"],                 # PLD reaches epsilon 0: log(0) once
    ["noise", *BASE, "--target-epsilon", "3", "--delta", "0.5"],  # the same through a large delta
    ["epsilon", *BASE, "--noise-multiplier", "1e-9"],               # dp_accounting overflowed exp()
])
def test_extreme_but_valid_input_answers(run, argv):
    code, out, err = run(*argv, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["epsilon"] is not None and result["epsilon"] >= 0
    if argv[0] == "noise":
        assert result["epsilon"] <= float(argv[argv.index("--target-epsilon") + 1])


def test_cli_module_never_imports_torch():
    code = (
        "import sys, argparse\n"
        "import privgrad.cli.accounting as m\n"
        "p = argparse.ArgumentParser(); m.add_arguments_for('epsilon', p)\n"
        "args = p.parse_args(['--dataset-size', '100', '--batch-size', '10', '--steps', '5', '--noise-multiplier', '1'])\n"
        "assert m.run_for('epsilon', args) == 0\n"
        "bad = sorted(x for x in sys.modules if x == 'torch' or x.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_mechanism_is_accounted_as_the_engine_does(run):
    """--mechanism bandmf:16: the noise the engine calibrates for that run, its rounds at 16 q,
    and the error to compare with DP-SGD's (sigma^2 (n + 1) / 2 on the prefix sum)."""
    import math

    from privgrad.mechanism_run import calibrate
    from privgrad.mechanisms import BandMF
    from privgrad.sampling.plan import SamplingPlan

    code, out, _ = run("noise", *BASE, "--target-epsilon", "3", "--mechanism", "bandmf:16", "--json")
    got = json.loads(out)
    q, steps = 256 / 60000, got["steps"]
    plan = SamplingPlan(60000, 16 * q, 256.0, True, 16)
    assert got["noise_multiplier"] == calibrate(BandMF(num_bands=16), plan, steps,
                                                target_epsilon=3.0, target_delta=1e-5,
                                                accountant="pld")
    assert got["accounted_steps"] == math.ceil(steps / 16) and got["accounted_sample_rate"] == 16 * q
    assert got["epsilon"] <= 3.0
    code, out, _ = run("noise", *BASE, "--target-epsilon", "3", "--mechanism", "dpsgd", "--json")
    dpsgd = json.loads(out)
    assert dpsgd["noise_error"] == pytest.approx(dpsgd["noise_multiplier"] ** 2 * (steps + 1) / 2)
    assert got["noise_error"] < dpsgd["noise_error"]  # BandMF's error is smaller here
    _, plain, _ = run("noise", *BASE, "--target-epsilon", "3", "--json")
    assert json.loads(plain)["noise_multiplier"] == dpsgd["noise_multiplier"]


@pytest.mark.parametrize("name,message", [
    ("bandmf", "mechanism must name a mechanism; got mechanism='bandmf'"),
    ("dpftrl:3", "mechanism must name a mechanism; got mechanism='dpftrl:3'"),
    ("blt:2:3:4", "got mechanism='blt:2:3:4'"),
    ("bandmf:0", "num_bands must be >= 1; got num_bands=0"),
    ("bandmf:5000", r"num_bands must be <= the number of steps \(2340\)"),
])
def test_bad_mechanism_names_the_choices(run, name, message):
    code, _, err = run("epsilon", *BASE, "--noise-multiplier", "1", "--mechanism", name)
    assert code == 2 and re.search(message, err), err
