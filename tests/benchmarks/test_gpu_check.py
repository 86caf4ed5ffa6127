"""``benchmarks/gpu_check.py`` without a GPU: the skip line, and the same checks run CPU against
CPU on tiny settings, including checks made to fail (the card's own numbers are run by hand)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.benchmarks.test_cli import BENCHMARKS, load

TINY = ["--device", "cpu", "--batch", "2", "--gpt2", "tiny", "--gpt2-batch", "2", "--seq", "8",
        "--rounds", "2"]


def run_main(module, argv, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *argv])
    return module.main()


def test_without_cuda_it_says_skipped_in_one_line_and_exits_0(monkeypatch, capsys):
    gpu_check = load("gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_main(gpu_check, [], monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: no CUDA device") and out.count("\n") == 1


@pytest.mark.slow
def test_the_checks_pass_cpu_against_cpu_as_a_command():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(BENCHMARKS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), *TINY, "--models",
                           "mlp,embedding,gpt2"], check=False, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert done.stdout.startswith("# gpu_check on CPU")
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["mlp", "embedding", "gpt2"]
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert cells[2].endswith(" ok") and cells[3].endswith(" ok"), r  # CPU against CPU
        assert cells[4:6] == ["ok", "ok"], r  # grads and batch on the device, its generator
        float(cells[6]), float(cells[7]), float(cells[8])


def test_a_device_result_off_the_cpu_fails_its_check_and_the_exit_status(monkeypatch, capsys):
    gpu_check = load("gpu_check")
    real, calls = gpu_check.private_grads, []

    def skewed(name, args, device, dtype):  # the device's run of each pair comes first
        grads = real(name, args, device, dtype)
        calls.append(dtype)
        if dtype == torch.float32 and len(calls) % 2 == 1:
            grads[1][0] = grads[1][0] * (1 + 1e-3)
        return grads

    monkeypatch.setattr(gpu_check, "private_grads", skewed)
    assert run_main(gpu_check, [*TINY, "--models", "mlp"], monkeypatch) == 1
    cells = [c.strip() for c in capsys.readouterr().out.splitlines()[-1].split("|")[1:-1]]
    assert cells[0] == "mlp" and cells[2].endswith(" ok")
    assert cells[3] == "1.0e-03 FAIL"


def test_noise_drawn_on_the_host_fails_the_noise_check(monkeypatch, capsys):
    gpu_check = load("gpu_check")
    from privgrad.privatize import TorchGaussian

    fill = TorchGaussian.fill

    def host_noise(self, out, std):  # noise from PyTorch's default generator, not the engine's
        torch.randn(1)
        return fill(self, out, std)

    monkeypatch.setattr(TorchGaussian, "fill", host_noise)
    assert run_main(gpu_check, [*TINY, "--models", "mlp"], monkeypatch) == 1
    cells = [c.strip() for c in capsys.readouterr().out.splitlines()[-1].split("|")[1:-1]]
    assert cells[4:6] == ["ok", "FAIL"]


def test_without_transformers_the_gpt2_row_says_so(monkeypatch, capsys):
    gpu_check = load("gpu_check")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert run_main(gpu_check, [*TINY, "--models", "gpt2"], monkeypatch) == 0
    assert "| gpt2 | - | not run: transformers not importable" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--models", "mlp,vgg"], "--models must name models of reference_models.py or gpt2; got vgg"),
    (["--rounds", "0"], "--rounds must be 1 or more; got 0"),
    (["--seq", "1"], "--seq must be 2 or more (a next token to predict); got 1"),
    (["--device", "mps"], "--device must be cuda or cpu; got 'mps'"),
])
def test_bad_arguments_are_refused_with_the_argument_and_value(argv, message, monkeypatch, capsys):
    gpu_check = load("gpu_check")
    with pytest.raises(SystemExit) as stop:
        run_main(gpu_check, argv, monkeypatch)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
