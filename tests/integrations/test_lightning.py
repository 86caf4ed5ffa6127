"""DPCallback on a real Lightning Trainer (CPU, a few steps)."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad.accounting import epsilon_for
from privgrad.errors import ConfigError, PrivacyStateError
from privgrad.integrations.lightning import DPCallback
from privgrad.monitoring import epsilon_after

DELTA = 1e-5
# Third-party warnings that are not ours to act on: Lightning's advice to use more DataLoader
# workers, and Lightning 2.6's use of a pytree class that torch 2.13 deprecates.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The '(train|val)_dataloader' does not have many workers"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
]


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n=128):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def trainer(tmp_path, **kwargs):
    options = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, enable_checkpointing=False)
    options.update(kwargs)
    return pl.Trainer(**options)


def test_fit_is_private_and_logs_epsilon(tmp_path):
    model = Classifier()
    keys = list(model.state_dict())
    dp = DPCallback(target_epsilon=2.0, target_delta=DELTA, max_grad_norm=1.0)
    t = trainer(tmp_path, callbacks=[dp])
    t.fit(model, train_dataloaders=DataLoader(data(), batch_size=32))
    engine = dp.engine
    assert engine.steps == t.global_step > 0          # every optimizer step went through the engine
    assert engine.settings.sample_rate == 32 / 128
    assert 0 < dp.epsilon <= 2.0
    assert t.callback_metrics["epsilon"].item() == pytest.approx(dp.epsilon)
    assert 0.0 <= t.callback_metrics["clip_fraction"].item() <= 1.0
    assert list(model.state_dict()) == keys             # nothing wrapped
    assert engine._module is None                       # hooks removed at fit end


def test_update_is_the_private_one(tmp_path):
    """With a tiny bound every example is clipped: the first update is at most lr * C, never the
    raw gradient's size (Lightning steps through optimizer.step(closure))."""
    model = Classifier()
    start = [p.detach().clone() for p in model.parameters()]
    dp = DPCallback(noise_multiplier=0.0, max_grad_norm=1e-4)
    trainer(tmp_path, callbacks=[dp], max_steps=1).fit(
        model, train_dataloaders=DataLoader(data(), batch_size=64))
    change = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    assert dp.engine.steps == 1
    assert 0 < change.norm() <= 0.1 * 1e-4 * (1 + 1e-6)


def test_budget_stop_ends_fit_before_overspending(tmp_path):
    model = Classifier()
    dp = DPCallback(noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=3.0)
    t = trainer(tmp_path, callbacks=[dp], max_epochs=100)
    t.fit(model, train_dataloaders=DataLoader(data(), batch_size=32))
    assert t.current_epoch < 100
    assert dp.epsilon <= 3.0 < epsilon_after(dp.engine, DELTA, 1)


@pytest.mark.parametrize("minimum", [dict(min_epochs=50), dict(min_steps=200)])
def test_budget_stop_refuses_a_trainer_that_cannot_stop(tmp_path, minimum):
    """Lightning ignores should_stop until min_epochs/min_steps are met: that would overspend."""
    model = Classifier()
    before = copy.deepcopy(model.state_dict())
    dp = DPCallback(noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=3.0)
    t = trainer(tmp_path, callbacks=[dp], max_epochs=100, **minimum)
    name = next(iter(minimum))
    with pytest.raises(ConfigError, match=f"free to stop.*Trainer\\({name}\\)=.*Remove {name}"):
        t.fit(model, train_dataloaders=DataLoader(data(), batch_size=32))
    assert dp.engine.settings is None  # refused before anything was attached
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_checkpoint_carries_the_budget(tmp_path):
    model = Classifier()
    dp = DPCallback(noise_multiplier=1.0, max_grad_norm=1.0)
    first = trainer(tmp_path, callbacks=[dp], max_epochs=1)
    first.fit(model, train_dataloaders=DataLoader(data(), batch_size=32))
    path = tmp_path / "one.ckpt"
    first.save_checkpoint(path)
    spent = dp.epsilon

    resumed = DPCallback(noise_multiplier=1.0, max_grad_norm=1.0)
    second = trainer(tmp_path, callbacks=[resumed], max_epochs=2)
    second.fit(Classifier(), train_dataloaders=DataLoader(data(), batch_size=32), ckpt_path=path)
    steps = resumed.engine.steps
    assert steps == second.global_step and resumed.engine.accountant.steps == steps > dp.engine.steps
    s = resumed.engine.settings
    assert resumed.epsilon == pytest.approx(epsilon_for(
        noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate, steps=steps, delta=DELTA))
    assert resumed.epsilon > spent


def test_refuses_accumulation_and_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        DPCallback(max_grad_norm=1.0)
    dp = DPCallback(noise_multiplier=1.0, max_grad_norm=1.0)
    t = trainer(tmp_path, callbacks=[dp], accumulate_grad_batches=2)
    with pytest.raises(ConfigError, match="accumulate_grad_batches must be 1; got accumulate_grad_batches=2"):
        t.fit(Classifier(), train_dataloaders=DataLoader(data(), batch_size=32))
    t2 = trainer(tmp_path, callbacks=[dp])
    t2.fit(Classifier(), train_dataloaders=DataLoader(data(), batch_size=32))
    with pytest.raises(PrivacyStateError, match="a DPCallback makes one fit private"):
        trainer(tmp_path, callbacks=[dp]).fit(Classifier(), train_dataloaders=DataLoader(data(), batch_size=32))


@pytest.mark.parametrize("length", [dict(max_epochs=2), dict(max_steps=5, max_epochs=3)])
def test_progress_bar_ends_on_the_final_epsilon(tmp_path, length):
    """Epsilon is logged every log_every_n_steps; the epoch-end log puts the final one in the bar,
    also when max_steps stops fit mid-epoch."""
    dp = DPCallback(noise_multiplier=1.0, target_delta=DELTA, max_grad_norm=1.0, log_every_n_steps=3)
    t = trainer(tmp_path, callbacks=[dp], **length)
    t.fit(Classifier(), train_dataloaders=DataLoader(data(), batch_size=32))
    assert dp.engine.steps % 3 != 0  # the last step was not one of the every-third-step logs
    assert t.progress_bar_metrics["epsilon"] == pytest.approx(dp.epsilon, rel=1e-6)


def test_noise_is_calibrated_for_the_steps_given(tmp_path):
    """``steps=`` (not epochs) sets the calibration horizon: after that many steps the run has
    spent the target, within the search's 0.1% in sigma, and not more."""
    from privgrad.accounting import get_noise_multiplier

    model = Classifier()
    dp = DPCallback(target_epsilon=2.0, target_delta=DELTA, max_grad_norm=1.0, steps=6,
                    accountant="rdp")
    trainer(tmp_path, callbacks=[dp], max_steps=6, max_epochs=10).fit(
        model, train_dataloaders=DataLoader(data(), batch_size=32))
    s = dp.engine.settings
    assert s.noise_multiplier == get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=32 / 128, steps=6, accountant="rdp")
    assert dp.engine.steps == 6
    assert 1.95 < dp.engine.get_epsilon(DELTA) <= 2.0


def test_epochs_and_steps_together_are_refused():
    with pytest.raises(ConfigError, match=r"at most one of epochs and steps may be given; got \(epochs, steps\)=\(2, 6\)"):
        DPCallback(target_epsilon=2.0, target_delta=DELTA, max_grad_norm=1.0, epochs=2, steps=6)


@pytest.mark.parametrize("target", [None, 2.0], ids=["noise", "epsilon"])
def test_a_correlated_mechanism_is_planned_for_the_fit(tmp_path, target):
    """``DPCallback(mechanism=BandMF(...))``: the noise is planned for the fit's steps (from
    max_epochs), with or without a target epsilon, and accounted as BandMF's rounds. Over 8
    steps, 2 bands are expected to be noisier than DP-SGD at epsilon 2: the calibration says
    so (``MechanismWarning``) through Lightning too."""
    import contextlib

    from privgrad.mechanisms import BandMF, MechanismWarning

    noise = {"noise_multiplier": 1.0} if target is None else {"target_epsilon": target,
                                                              "target_delta": DELTA}
    dp = DPCallback(max_grad_norm=1.0, mechanism=BandMF(num_bands=2), **noise)
    t = trainer(tmp_path, callbacks=[dp], max_epochs=2)
    warned = (pytest.warns(MechanismWarning, match=r"BandMF\(num_bands=2.*at epsilon 2 over 8 "
                           r"steps.*more noise than DP-SGD") if target is not None
              else contextlib.nullcontext())
    with warned:
        t.fit(Classifier(), train_dataloaders=DataLoader(data(), batch_size=32))
    engine = dp.engine
    assert engine.steps == t.global_step == 8 and engine.settings.planned_steps == 8
    (entry,) = engine.accountant.history
    assert (entry.num_steps, entry.sample_rate) == (4, 2 * 32 / 128)
    if target is not None:
        assert 1.95 < dp.epsilon <= 2.0
