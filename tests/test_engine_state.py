"""``PrivacyEngine.state_dict()``/``load_state_dict()``: one description of everything that must
survive a restart, used by every resume path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from privgrad import PrivacyEngine, run_state
from privgrad.errors import CheckpointError, PrivacyStateError
from tests.helpers import Indexed


def _run(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    options = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    options.update(kwargs)
    _, _, dl = engine.make_private(module=model, optimizer=opt,
                                   data_loader=DataLoader(Indexed(30), batch_size=6), **options)
    return model, opt, engine, dl


def _steps(model, opt, dl, n):
    out = []
    while len(out) < n:
        for i in dl:
            opt.zero_grad()
            model(i.float().unsqueeze(1).expand(-1, 3)).sum().backward()
            opt.step()
            out.append((tuple(i.tolist()), model[2].weight.grad.clone()))
            if len(out) == n:
                break
    return out


def test_every_attribute_of_the_engine_is_saved_or_said_not_to_be():
    """A new attribute cannot silently miss checkpoints: classify it in SAVED or NOT_SAVED."""
    model, opt, engine, dl = _run()
    _steps(model, opt, dl, 2)
    attributes = set(vars(engine))
    unclassified = attributes - set(run_state.SAVED) - set(run_state.NOT_SAVED)
    assert not unclassified, f"classify these in run_state.SAVED or NOT_SAVED: {unclassified}"
    assert not set(run_state.SAVED) & set(run_state.NOT_SAVED)
    assert set(run_state.SAVED.values()) <= set(engine.state_dict())


def test_state_round_trip_continues_exactly_where_the_run_stopped():
    model, opt, engine, dl = _run()
    whole = _steps(model, opt, dl, 7)
    model, opt, engine, dl = _run()
    _steps(model, opt, dl, 4)
    state, weights = engine.state_dict(), model.state_dict()
    model, opt, fresh, dl = _run(seed=123)  # another seed: the rest must come from the state
    model.load_state_dict(weights)
    fresh.load_state_dict(state)
    assert fresh.steps == 4 and fresh.get_epsilon(1e-5) == pytest.approx(engine.get_epsilon(1e-5))
    rest = _steps(model, opt, dl, 3)
    assert [b for b, _ in rest] == [b for b, _ in whole[4:]]
    for (_, a), (_, b) in zip(rest, whole[4:]):
        assert torch.equal(a, b)


def test_state_is_refused_in_the_middle_of_a_step_and_after_releases():
    model, opt, engine, dl = _run()
    state = engine.state_dict()
    i = next(iter(dl))
    model(i.float().unsqueeze(1).expand(-1, 3)).sum().backward()
    with pytest.raises(PrivacyStateError, match="must run between steps"):
        engine.state_dict()
    opt.step()
    with pytest.raises(PrivacyStateError, match="before the first step"):
        engine.load_state_dict(state)


@pytest.mark.parametrize("change, field", [
    (dict(noise_multiplier=2.0), "noise_multiplier"),
    (dict(max_grad_norm=0.5), "max_grad_norm"),
    (dict(loss_reduction="sum"), "loss_reduction"),
])
def test_a_state_from_other_settings_is_refused_and_changes_nothing(change, field):
    _, _, engine, _ = _run()
    state = engine.state_dict()
    _, _, other, _ = _run(**change)
    before = other.state_dict()
    with pytest.raises(CheckpointError, match=f"privacy setting {field}"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert after["noise"]["seed"] == before["noise"]["seed"] and after["steps"] == 0


def test_a_state_that_is_not_one_is_refused():
    _, _, engine, _ = _run()
    with pytest.raises(CheckpointError, match="format"):
        engine.load_state_dict({"steps": 3})


def test_the_state_is_plain_data_that_torch_loads_with_weights_only(tmp_path):
    model, opt, engine, dl = _run()
    _steps(model, opt, dl, 2)
    torch.save(engine.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["steps"] == 2 and state["sampler"]["step"] == 2
    assert set(state["noise"]["generators"]) == {"cpu"}


def test_noise_does_not_follow_the_global_stream_after_make_private():
    """The engine's noise has its own generator: user code drawing random numbers between steps
    (augmentation, dropout) does not move it, and a resume needs only the engine's state."""
    runs = []
    for draws in (0, 5):
        model, opt, engine, dl = _run()
        torch.randn(draws)
        runs.append(_steps(model, opt, dl, 2))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*runs))
