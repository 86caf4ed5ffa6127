"""Checkpoints: exact resume, atomic writes, and clear errors that change nothing."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privgrad import PrivacyEngine
from privgrad.errors import CheckpointError, ConfigError, PrivacyStateError
from tests.reliability import checks


@pytest.mark.parametrize("stop_after", [1, 6, 8, 17])  # first step, epoch boundary, mid-epoch
def test_resume_is_bit_for_bit_at_sigma_zero(tmp_path, stop_after):
    checks.check_resume_is_exact(tmp_path / "run.pt", sigma=0.0, stop_after=stop_after)


def test_resume_outside_secure_mode_replays_the_noise_too(tmp_path):
    checks.check_resume_is_exact(tmp_path / "run.pt", sigma=1.3)


def _run_until(path, steps: int, **kwargs):
    run = checks.attach(0, sigma=1.0, **kwargs)
    checks.train(run, stop_after=steps, path=path)
    return run


def _snapshot(run) -> dict:
    model, opt, scheduler, engine, _ = run
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "accountant": engine.accountant.state_dict(),
        "steps": engine.steps,
        "sampler": (engine._sampler.step, engine._sampler_seed, engine._sampler.bits),
        "rng": torch.get_rng_state(),
    }


def _assert_unchanged(before: dict, run) -> None:
    after = _snapshot(run)
    for key in ("accountant", "steps", "sampler", "scheduler"):
        assert after[key] == before[key], key
    assert torch.equal(after["rng"], before["rng"])
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v), k
    assert repr(after["optimizer"]) == repr(before["optimizer"])


def _load(run, path, **kwargs):
    model, opt, scheduler, engine, _ = run
    return engine.load_checkpoint(path, module=model, optimizer=opt, scheduler=scheduler, **kwargs)


def test_file_is_plain_data_that_loads_with_weights_only(tmp_path):
    path = tmp_path / "run.pt"
    _run_until(path, 3)
    blob = torch.load(path, weights_only=True)
    assert blob["privgrad_checkpoint"] == 2
    engine = blob["payload"]["engine"]
    assert engine["steps"] == 3 and engine["sampler"]["step"] == 3
    assert engine["accountant"]["history"] == [[1.0, 8 / 48, 3]]
    assert "grad_scaler" not in blob["payload"] and engine["grad_scaler"] is None  # engine's own
    assert not [f for f in os.listdir(tmp_path) if f != "run.pt"]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_file_is_refused_and_changes_nothing(tmp_path, damage):
    path = tmp_path / "run.pt"
    _run_until(path, 4)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) * 2 // 3]
    elif damage == "flip":  # inside a tensor: torch.load itself does not notice
        raw[len(raw) // 2] ^= 0x40
    elif damage == "garbage":
        raw = bytearray(b"not a checkpoint at all" * 10)
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    live = checks.attach(1, sigma=1.0)
    before = _snapshot(live)
    with pytest.raises(CheckpointError, match="(cannot be read|SHA-256 digest).*earlier checkpoint"):
        _load(live, path)
    _assert_unchanged(before, live)


def test_a_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"privgrad_checkpoint": 1, "payload": os.getcwd}, f)  # a callable
    live = checks.attach(1, sigma=1.0)
    with pytest.raises(CheckpointError, match="cannot be read"):
        _load(live, path)


def test_a_file_without_the_marker_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": nn.Linear(2, 2).state_dict()}, path)
    live = checks.attach(1, sigma=1.0)
    with pytest.raises(CheckpointError, match="must be a privgrad checkpoint.*'privgrad_checkpoint'"):
        _load(live, path)


def test_missing_file(tmp_path):
    live = checks.attach(1, sigma=1.0)
    with pytest.raises(CheckpointError, match=r"existing checkpoint file; got path=.*nope\.pt"):
        _load(live, tmp_path / "nope.pt")


@pytest.mark.parametrize("change, message", [
    (dict(sigma=1.1), "privacy setting noise_multiplier; got 1.0 saved and 1.1 here"),
    (dict(max_grad_norm=1.0), "privacy setting max_grad_norm; got 0.5 saved and 1.0 here"),
    (dict(optimizer="sgd"), "optimizer type; got 'Adam' saved and 'SGD' here"),
    (dict(secure=True), "secure mode; got False saved and True here"),
    (dict(loss_reduction="sum"), "privacy setting loss_reduction"),
])
def test_another_configuration_is_refused_and_changes_nothing(tmp_path, change, message):
    path = tmp_path / "run.pt"
    _run_until(path, 4)
    sigma = change.pop("sigma", 1.0)
    bound = change.pop("max_grad_norm", None)
    live = checks.attach(1, sigma=sigma, **change)
    if bound is not None:  # rebuild with another bound
        live[3].detach()
        live = _rebuilt_with_bound(bound)
    before = _snapshot(live)
    with pytest.raises(CheckpointError, match=message):
        _load(live, path)
    _assert_unchanged(before, live)


def _rebuilt_with_bound(bound: float):
    torch.manual_seed(1)
    model = checks.Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(
        module=model, optimizer=opt,
        data_loader=torch.utils.data.DataLoader(checks.data(), batch_size=checks.BATCH),
        noise_multiplier=1.0, max_grad_norm=bound)
    return model, opt, scheduler, engine, dl


def test_another_model_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    _run_until(path, 2)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    engine = PrivacyEngine(accountant="rdp")
    engine.make_private(module=model, optimizer=opt,
                        data_loader=torch.utils.data.DataLoader(checks.data(), batch_size=8),
                        noise_multiplier=1.0, max_grad_norm=0.5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=r"model parameters \(name, shape, dtype\)"):
        engine.load_checkpoint(path, module=model, optimizer=opt, scheduler=scheduler)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_another_accountant_or_missing_scheduler_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    _run_until(path, 2)
    torch.manual_seed(1)
    model = checks.Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    engine = PrivacyEngine(accountant="pld")
    engine.make_private(module=model, optimizer=opt,
                        data_loader=torch.utils.data.DataLoader(checks.data(), batch_size=8),
                        noise_multiplier=1.0, max_grad_norm=0.5)
    with pytest.raises(CheckpointError, match="same accountant; got 'rdp' saved and 'pld' here"):
        engine.load_checkpoint(path, module=model, optimizer=opt)
    live = checks.attach(1, sigma=1.0)
    with pytest.raises(CheckpointError, match="scheduler type; got 'StepLR' saved and None here"):
        live[3].load_checkpoint(path, module=live[0], optimizer=live[1])


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    run = _run_until(path, 2)
    good = path.read_bytes()
    model, opt, scheduler, engine, _ = run

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint(path, module=model, optimizer=opt, scheduler=scheduler)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["run.pt"]  # the temporary file is gone


def test_unwritable_paths_are_refused(tmp_path):
    model, opt, scheduler, engine, _ = checks.attach(0, sigma=1.0)
    with pytest.raises(ConfigError, match=r"existing, writable directory; got path=.*missing"):
        engine.save_checkpoint(tmp_path / "missing" / "run.pt", module=model, optimizer=opt)
    with pytest.raises(ConfigError, match="must name a file, not a directory"):
        engine.save_checkpoint(tmp_path, module=model, optimizer=opt)
    with pytest.raises(ConfigError, match="path must be a str or os.PathLike; got path=3"):
        engine.save_checkpoint(3, module=model, optimizer=opt)


def test_save_needs_the_attached_objects_between_steps(tmp_path):
    path = tmp_path / "run.pt"
    model = checks.Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyStateError, match="before make_private"):
        PrivacyEngine().save_checkpoint(path, module=model, optimizer=opt)
    model, opt, scheduler, engine, dl = checks.attach(0, sigma=1.0)
    with pytest.raises(ConfigError, match="module must be the object passed to make_private"):
        engine.save_checkpoint(path, module=checks.Net(), optimizer=opt)
    x, y, _ = next(iter(dl))
    F.cross_entropy(model(x), y).backward()  # no optimizer.step() yet
    with pytest.raises(PrivacyStateError, match="must run between steps"):
        engine.save_checkpoint(path, module=model, optimizer=opt)
    assert not path.exists()


def test_secure_mode_resumes_the_accounting_not_the_batches(tmp_path):
    path = tmp_path / "run.pt"
    run = _run_until(path, 4, secure=True)
    resumed = checks.attach(1, sigma=1.0, secure=True)
    _load(resumed, path)
    engine = resumed[3]
    assert engine.steps == 4 and engine._sampler.step == 4 and engine._sampler_seed is None
    assert engine.accountant.history == run[3].accountant.history
    blob = torch.load(path, weights_only=True)
    assert blob["payload"]["engine"]["sampler"]["seed"] is None  # nothing secret to store


def test_grad_scaler_state_travels_with_the_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**9)
    model, opt, scheduler, engine, _ = checks.attach(0, sigma=1.0, grad_scaler=scaler)
    engine.save_checkpoint(path, module=model, optimizer=opt, scheduler=scheduler)
    other = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    live = checks.attach(1, sigma=1.0, grad_scaler=other)
    _load(live, path)
    assert other.get_scale() == 2.0**9
    plain = checks.attach(2, sigma=1.0)
    with pytest.raises(CheckpointError, match="same use of a grad_scaler; got True saved and False here"):
        _load(plain, path)
