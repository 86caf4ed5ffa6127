"""The user's loop (PRIVACY_TESTS.md rows 15-20): the twelve holes an adversarial review found.

Each test reproduces one ordinary training pattern that used to release more than the reported
epsilon, and passes only if the library refuses the pattern before anything is released or
handles it exactly. Rows 1 and 6 are membership attacks run over many seeds: the attack's
true-positive rate at its (structural) false-positive rate must stay within what (epsilon, delta)
allows, by Clopper-Pearson intervals at alpha = 1e-3 on each side.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from privgrad import PrivacyEngine, validate
from privgrad.accounting import epsilon_for
from privgrad.errors import ConfigError, ModelValidationError, PrivacyStateError
from tests.helpers import Indexed, drawn

DELTA = 1e-5
ALPHA = 1e-3


def _lightning(test):
    """A slow Lightning test, without the third-party warnings that are not ours to act on."""
    for mark in (pytest.mark.slow,
                 pytest.mark.filterwarnings("ignore:The '(train|val)_dataloader' does not have "
                                            "many workers"),
                 pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is "
                                            r"deprecated:FutureWarning")):
        test = mark(test)
    return test


# -- membership harness ------------------------------------------------------------------------
def within_dp(tp: int, fp: int, n: int, epsilon: float, delta: float = DELTA) -> bool:
    """Whether ``tp`` hits among ``n`` member runs and ``fp`` among ``n`` others are possible
    under (epsilon, delta)-DP: TPR <= e^eps FPR + delta, with TPR's lower and FPR's upper
    Clopper-Pearson bounds."""
    tpr_low = beta.ppf(ALPHA, tp, n - tp + 1) if tp > 0 else 0.0
    fpr_high = beta.ppf(1 - ALPHA, fp + 1, n - fp) if fp < n else 1.0
    return tpr_low <= math.exp(epsilon) * fpr_high + delta


def attack(trial, n: int) -> tuple[int, int]:
    """``trial(seed, member) -> bool`` (the attack's guess; False when nothing was released)."""
    tp = sum(bool(trial(seed, True)) for seed in range(n))
    fp = sum(bool(trial(seed, False)) for seed in range(n, 2 * n))
    return tp, fp


def refused(fn, errors=(ModelValidationError, PrivacyStateError)):
    """Run ``fn``; ``None`` if the library refused it (nothing released)."""
    try:
        return fn()
    except errors:
        return None


# -- 1. embedding max_norm ---------------------------------------------------------------------
RARE = 15  # the canary's token; no other record uses it


class Bag(nn.Module):
    def __init__(self, max_norm):
        super().__init__()
        self.emb = nn.Embedding(20, 4, max_norm=max_norm)
        with torch.no_grad():
            self.emb.weight.mul_(3.0 / self.emb.weight.norm(dim=1, keepdim=True))  # norms 3
        self.emb.requires_grad_(False)  # frozen: its rows get no noise at all
        self.head = nn.Linear(4, 2)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


def _tokens(member: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 10, (20, 3), generator=g)
    if member:
        idx[0] = RARE
    return TensorDataset(idx, torch.randint(0, 2, (20,), generator=g))


def _train_bag(seed: int, member: bool, *, max_norm, project: bool):
    torch.manual_seed(seed)
    model = Bag(max_norm)
    before = model.emb.weight[RARE].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=2.0,
                                   data_loader=DataLoader(_tokens(member, seed), batch_size=10),
                                   max_grad_norm=1.0)
    for _ in range(2):
        for x, y in dl:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if project:  # the supported way: post-processing of the released weight
                with torch.no_grad():
                    model.emb.weight.copy_(torch.renorm(model.emb.weight, 2, 0, 1.0))
    return not torch.equal(model.emb.weight[RARE], before)  # the attack: was the row touched?


def test_embedding_max_norm_is_reported_and_refused():
    findings = validate(Bag(1.0))
    assert [f.path for f in findings] == ["emb"] and "max_norm" in findings[0].problem
    with pytest.raises(ModelValidationError, match=r"emb \(Embedding\): max_norm=1.0"):
        _train_bag(0, True, max_norm=1.0, project=False)


def test_embedding_max_norm_set_after_make_private_is_refused_before_the_write():
    model = Bag(None)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=1.0,
                                   data_loader=DataLoader(_tokens(True, 0), batch_size=10),
                                   max_grad_norm=1.0)
    model.emb.max_norm = 1.0
    weight = model.emb.weight.clone()
    x, _ = next(iter(dl))
    for call in (lambda: model(x), lambda: model.emb(x)):  # the root, or the submodule directly
        with torch.no_grad(), pytest.raises(ModelValidationError, match="emb .*max_norm=1.0"):
            call()
    assert torch.equal(model.emb.weight, weight)  # nothing was written


@pytest.mark.slow
@pytest.mark.parametrize("max_norm, project", [(1.0, False), (None, True)],
                         ids=["max_norm in the forward", "projection after the step"])
def test_embedding_row_membership_stays_within_epsilon(max_norm, project):
    n = 200 if max_norm else 40  # (projected: the row moves in every run, members or not)
    tp, fp = attack(lambda s, m: refused(
        lambda: _train_bag(s, m, max_norm=max_norm, project=project)), n)
    eps = epsilon_for(noise_multiplier=2.0, sample_rate=0.5, steps=4, delta=DELTA)
    assert within_dp(tp, fp, n, eps), (tp, fp, eps)


# -- 6. frozen BatchNorm switched to train mode -----------------------------------------------
class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        self.features.requires_grad_(False)
        self.features.eval()  # frozen and in eval mode: what validate() accepts
        self.head = nn.Linear(3, 2)


def _records(member: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 3, generator=g) * 0.1
    if member:
        x[0] = 500.0  # the canary: far from every other record
    return TensorDataset(x, torch.randint(0, 2, (20,), generator=g))


def _train_frozen_features(seed: int, member: bool) -> bool:
    torch.manual_seed(seed)
    model = Backbone()
    before = model.features[1].running_mean.clone()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=2.0,
                                   data_loader=DataLoader(_records(member, seed), batch_size=10),
                                   max_grad_norm=1.0)
    for _ in range(2):
        model.train()  # the usual epoch start: the frozen BatchNorm goes back to training mode
        for x, y in dl:
            opt.zero_grad()
            with torch.no_grad():  # frozen features under no_grad, a submodule called directly
                f = model.features(x)
            F.cross_entropy(model.head(f), y).backward()
            opt.step()
    return bool((model.features[1].running_mean - before).abs().max() > 1.0)


def test_frozen_batch_norm_in_train_mode_is_refused_through_a_submodule_without_grad():
    with pytest.raises(ModelValidationError, match=r"features\.1 \(BatchNorm1d\).*training mode"):
        _train_frozen_features(0, True)


@pytest.mark.slow
def test_batch_norm_statistics_membership_stays_within_epsilon():
    n = 200
    tp, fp = attack(lambda s, m: refused(lambda: _train_frozen_features(s, m)), n)
    eps = epsilon_for(noise_multiplier=2.0, sample_rate=0.5, steps=4, delta=DELTA)
    assert within_dp(tp, fp, n, eps), (tp, fp, eps)


# -- 2. per-layer clipping and parameters that become trainable later --------------------------
def _two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model[1].requires_grad_(False)
    return model


def _per_layer_release(model, opt, engine, x):
    """The update one record ``x`` alone releases (sigma = 0, summed loss), or None if refused."""
    drawn(engine, len(x))
    opt.zero_grad()
    try:
        (model(x) * 1e3).sum().backward()  # far above every bound
        opt.step()
    except PrivacyStateError:
        return None
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("how", ["requires_grad_", "add_param_group"])
def test_per_layer_bound_is_fixed_when_the_guarantee_is_set(how):
    model = _two_layers()
    if how == "requires_grad_":
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
    else:
        opt = torch.optim.SGD(model[0].parameters(), lr=0.0)
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=1.0,
                        clipping="per_layer", loss_reduction="sum",
                        data_loader=DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    x = torch.randn(1, 4)
    first = _per_layer_release(model, opt, engine, x)
    assert first is not None and first.norm() <= 1.0 * (1 + 1e-5)
    model[1].requires_grad_(True)  # gradual unfreezing
    if how == "add_param_group":
        opt.add_param_group({"params": model[1].parameters()})
    steps = engine.steps
    second = _per_layer_release(model, opt, engine, x)
    # refused (nothing released, nothing spent), or within the one bound the noise is set for
    assert second is None or second.norm() <= 1.0 * (1 + 1e-5), second.norm()
    assert second is not None or engine.steps == steps


def test_flat_clipping_keeps_the_bound_when_a_parameter_is_unfrozen():
    model = _two_layers()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=1.0,
                        loss_reduction="sum",
                        data_loader=DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    x = torch.randn(1, 4)
    assert _per_layer_release(model, opt, engine, x).norm() == pytest.approx(1.0, rel=1e-5)
    model[1].requires_grad_(True)
    update = _per_layer_release(model, opt, engine, x)  # the self-check covers the new ones
    assert update.numel() == sum(p.numel() for p in model.parameters())
    assert update.norm() == pytest.approx(1.0, rel=1e-5)


# -- 3 and 4. resuming never replays the sampler or the noise ---------------------------------
def _resumable(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: releases depend on batches/noise only
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=1.0,
                                   data_loader=DataLoader(Indexed(40), batch_size=10),
                                   max_grad_norm=1.0)
    return model, opt, engine, dl


def _releases(model, opt, dl, steps):
    out = []
    for _, i in zip(range(steps), _forever(dl)):
        opt.zero_grad()
        model(i.float().unsqueeze(1).expand(-1, 3)).sum().backward()
        opt.step()
        out.append((tuple(i.tolist()), model.weight.grad.clone()))
    return out


def _forever(dl):
    while True:
        yield from dl


@pytest.mark.parametrize("restore_rng", [True, False])
def test_a_resumed_run_in_a_process_seeded_like_the_first_never_replays(tmp_path, restore_rng):
    model, opt, engine, dl = _resumable(0)
    whole = _releases(model, opt, dl, 6)
    model, opt, engine, dl = _resumable(0)
    _releases(model, opt, dl, 3)
    engine.save_checkpoint(tmp_path / "c.pt", module=model, optimizer=opt)
    model, opt, engine, dl = _resumable(0)  # torch.manual_seed(0) again, like the first run
    engine.load_checkpoint(tmp_path / "c.pt", module=model, optimizer=opt, restore_rng=restore_rng)
    resumed = _releases(model, opt, dl, 3)
    for (batch, grad), (first_batch, first_grad) in zip(resumed, whole[:3]):
        assert not torch.equal(grad, first_grad)  # the first releases' noise is never reused
    for (batch, grad), (same_batch, same_grad) in zip(resumed, whole[3:]):
        assert batch == same_batch and torch.equal(grad, same_grad)  # it continues exactly


@_lightning
def test_lightning_resume_under_seed_everything_continues_instead_of_replaying(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from privgrad.integrations.lightning import DPCallback

    class Releases(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            return self.lin(batch.float().unsqueeze(1).expand(-1, 3)).sum()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.seen.append((tuple(batch.tolist()), self.lin.weight.grad.clone()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # releases: batches and noise only

    def fit(max_steps, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = Releases()
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp_path,
                             callbacks=[DPCallback(noise_multiplier=1.0, max_grad_norm=1.0)])
        trainer.fit(model, DataLoader(Indexed(40), batch_size=10), ckpt_path=ckpt_path)
        return model.seen, trainer

    whole, _ = fit(8)
    first, trainer = fit(4)  # one epoch (q = 1/4), then a checkpoint
    trainer.save_checkpoint(tmp_path / "dp.ckpt")
    resumed, _ = fit(8, ckpt_path=tmp_path / "dp.ckpt")
    assert [b for b, _ in first] == [b for b, _ in whole[:4]]
    assert len(resumed) == 4
    for (batch, grad), (old_batch, old_grad) in zip(resumed, whole[:4]):
        assert not torch.equal(grad, old_grad)  # never the first run's noise again
    for (batch, grad), (same_batch, same_grad) in zip(resumed, whole[4:]):
        assert batch == same_batch and torch.equal(grad, same_grad)


def test_load_checkpoint_into_an_engine_that_released_steps_is_refused(tmp_path):
    model, opt, engine, dl = _resumable(0)
    _releases(model, opt, dl, 2)
    engine.save_checkpoint(tmp_path / "c.pt", module=model, optimizer=opt)
    _releases(model, opt, dl, 1)
    eps = engine.get_epsilon(DELTA)
    with pytest.raises(PrivacyStateError, match=r"before the first step.*released 3 step"):
        engine.load_checkpoint(tmp_path / "c.pt", module=model, optimizer=opt)
    assert engine.steps == 3 and engine.get_epsilon(DELTA) == eps


# -- 5. leaving virtual batches in the middle of a logical batch -------------------------------
def test_breaking_out_of_virtual_batches_carries_nothing_into_the_next_release():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    data = TensorDataset(torch.randn(40, 3))
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=0.0,
                                   max_grad_norm=0.1, loss_reduction="sum",
                                   data_loader=DataLoader(data, batch_size=20))
    with engine.virtual_batches(dl, max_physical_batch_size=4) as chunks:
        for (x,) in chunks:
            opt.zero_grad()
            (model(x) * 100).sum().backward()
            opt.step()
            break  # abandon the logical batch after its first chunk
    assert engine.steps == 0
    steps_before = engine.steps
    with engine.virtual_batches(dl, max_physical_batch_size=4) as chunks:
        rows = []
        for (x,) in chunks:
            rows.append(x)
            opt.zero_grad()
            (model(x) * 100).sum().backward()
            opt.step()
            if engine.steps > steps_before:
                break
    batch = torch.cat(rows)
    g = 100 * batch  # each row's gradient of its own loss
    expected = (g * (0.1 / g.norm(dim=1, keepdim=True)).clamp(max=1)).sum(0)
    torch.testing.assert_close(model.weight.grad[0], expected, rtol=1e-5, atol=1e-7)


# -- 7 and 8. per-sample gradients that do not add up -----------------------------------------
class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = self.inp(x)
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.out(h)


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, idx):
        return F.linear(self.mix(self.emb(idx)), self.emb.weight)  # the weight outside its call


def _weight_normed():
    return nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 1))


def _first_step(model, x, y=None, loss=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=1e6,
                        data_loader=DataLoader(TensorDataset(x), batch_size=max(1, len(x) // 2)))
    drawn(engine, len(x))
    out = model(x)
    (loss(out, y) if loss else out.sum()).backward()
    opt.step()
    return engine


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize("case", ["reentrant checkpoint", "tied head via F.linear",
                                  "old-style weight_norm"])
def test_per_sample_gradients_that_do_not_add_up_are_refused_naming_the_parameter(case):
    torch.manual_seed(0)
    if case == "reentrant checkpoint":
        model, x, names = Checkpointed(True), torch.randn(6, 3), r"block\.0\.weight"
    elif case == "tied head via F.linear":
        model, x, names = TiedHead(), torch.randint(0, 10, (6, 5)), r"emb\.weight"
    else:
        model, x, names = _weight_normed(), torch.randn(6, 3), r"0\.weight_g"
    with pytest.raises(PrivacyStateError, match=f"must add up to autograd's gradient.*{names}"):
        _first_step(model, x)


def test_non_reentrant_checkpoint_passes_the_check_and_is_exact():
    torch.manual_seed(0)
    model, x = Checkpointed(False), torch.randn(6, 3)
    engine = _first_step(model, x)
    assert engine.steps == 1 and not engine._checking  # checked, and conclusive


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_opacus_recurrent_layer_served_twice_is_refused(batch_first):
    opacus_layers = pytest.importorskip("opacus.layers")
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = opacus_layers.DPLSTM(3, 4, batch_first=batch_first)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1] if batch_first else out[-1])

    x = torch.randn(1, 5, 3) if batch_first else torch.randn(5, 1, 3)  # batch of one
    with pytest.raises(PrivacyStateError, match=r"must add up|same number of examples"):
        _first_step(Model(), x)


# -- 9. empty Poisson batches -----------------------------------------------------------------
class Positions(nn.Module):
    """BERT-style: position ids with a batch dimension of 1, added to the token embeddings."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1]).unsqueeze(0)
        return self.head((self.tok(idx) + self.pos(positions)).mean(1))


def _conv32():
    return nn.Sequential(nn.Conv2d(32, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


@pytest.mark.parametrize("make, example", [
    (Positions, lambda n: torch.randint(0, 10, (n, 6))),
    (_conv32, lambda n: torch.randn(n, 32, 6, 6)),
    (lambda: nn.Sequential(nn.Conv1d(32, 4, 3), nn.Flatten(), nn.Linear(16, 2)),
     lambda n: torch.randn(n, 32, 6)),
], ids=["batch-1 position embedding", "Conv2d 32 channels", "Conv1d 32 channels"])
@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_an_empty_poisson_batch_is_a_noisy_step_not_a_crash(make, example, mode):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    data = TensorDataset(example(200), torch.randint(0, 2, (200,)))
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=1.0,
                                   max_grad_norm=1.0, grad_sample_mode=mode,
                                   sample_rate=1e-9, expected_batch_size=1.0,
                                   data_loader=DataLoader(data, batch_size=1))
    x, y = next(iter(dl))
    assert len(x) == 0
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    assert engine.steps == 1
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, b)  # noise landed everywhere


# -- 10. sequence-first tensors ----------------------------------------------------------------
class SequenceFirst(nn.Module):
    """Every layer sees (T, B, ...): each position would be an 'example'."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, idx):  # idx: (B, T) from the loader
        return self.head(self.emb(idx.t())).sum(0)  # (T, B, 4) -> (T, B, 1) -> (B, 1)


def test_sequence_first_rows_are_refused_before_any_release():
    torch.manual_seed(0)
    model = SequenceFirst()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    data = TensorDataset(torch.randint(0, 10, (64, 5)))  # T = 5, B around 16
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=0.0,
                                   max_grad_norm=1.0, loss_reduction="sum",
                                   data_loader=DataLoader(data, batch_size=16))
    with pytest.raises(PrivacyStateError, match="rows clipped in one step must be the examples"):
        for (idx,) in dl:
            if len(idx) == 5:
                continue  # (T == B is the one case rows cannot tell apart: see docs/privacy.md)
            opt.zero_grad()
            model(idx).sum().backward()
            opt.step()
    assert engine.steps == 0


# -- 11. misuse ---------------------------------------------------------------------------------
def _attached(model=None, sigma=1.0, **kwargs):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=model, optimizer=opt, noise_multiplier=sigma,
                                   max_grad_norm=1.0, **kwargs,
                                   data_loader=DataLoader(TensorDataset(torch.randn(40, 3)),
                                                          batch_size=8))
    return model, opt, engine, dl


def test_a_second_optimizer_stepped_first_never_applies_the_raw_gradient():
    model, opt, engine, dl = _attached()
    other = torch.optim.SGD(model.parameters(), lr=1.0)
    for (x,), _ in zip(dl, range(3)):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        model(x).sum().backward()
        other.step()  # before the private step: it must find no raw gradient to apply
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        opt.step()


def test_two_poisson_batches_of_one_size_in_one_backward_are_refused():
    """Gradient accumulation done by hand: the losses of two loop iterations in one backward."""
    model, opt, engine, dl = _attached(sigma=0.0, sample_rate=1.0, expected_batch_size=40)
    first = 0  # q = 1: every batch holds all 40 records, so the sizes always agree
    with pytest.raises(PrivacyStateError, match="different batches"):
        for i, (x,) in zip(range(2), _forever(dl)):  # same sizes: what a size check cannot see
            if i == first:
                loss = model(x).sum()
            else:
                (loss + model(x).sum()).backward()
                opt.step()
    assert engine.steps == 0


def test_a_step_without_a_backward_pass_is_refused_and_spends_nothing():
    model, opt, engine, dl = _attached()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyStateError, match="must follow a backward pass"):
        opt.step()
    assert engine.steps == 0 and engine.get_epsilon(DELTA) == 0.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_a_model_with_nothing_to_train_is_refused():
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ConfigError, match="at least one trainable parameter"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4),
            noise_multiplier=1.0, max_grad_norm=1.0)


def test_training_on_the_original_loader_is_refused():
    model, opt, engine, _ = _attached()
    weights = [p.detach().clone() for p in model.parameters()]
    original = DataLoader(TensorDataset(torch.randn(40, 3)), batch_size=8)  # not Poisson
    (x,) = next(iter(original))
    opt.zero_grad()
    model(x).sum().backward()
    with pytest.raises(PrivacyStateError, match="private loader drew"):
        opt.step()
    assert engine.steps == 0 and engine.get_epsilon(DELTA) == 0.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_a_gan_generator_backward_through_the_private_discriminator_is_set_aside():
    """Opacus's DCGAN: the discriminator steps privately on real data (drawn); the generator's
    backward then runs through it on generated data. Those sums are never released: the next
    discriminator step releases only its own drawn batch."""
    torch.manual_seed(0)
    disc = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    gen = nn.Linear(2, 3)
    reference = copy.deepcopy(disc)  # lr 0: the discriminator stays as it is
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.0)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(module=disc, optimizer=opt_d, noise_multiplier=0.0,
                                   max_grad_norm=1e6, loss_reduction="sum",
                                   data_loader=DataLoader(TensorDataset(torch.randn(40, 3)),
                                                          batch_size=8))
    for _, (real,) in zip(range(3), _forever(dl)):
        opt_d.zero_grad()
        disc(real).sum().backward()  # the private step: real rows only
        opt_d.step()
        released = {n: p.grad.clone() for n, p in disc.named_parameters()}
        ref = torch.autograd.grad(reference(real).sum(), list(reference.parameters()))
        for (n, g), r in zip(released.items(), ref):
            torch.testing.assert_close(g, r)  # nothing of the generator's pass in it
        opt_g.zero_grad()
        disc(gen(torch.randn(5, 2))).sum().backward()  # generator's step through D
        opt_g.step()
    assert engine.steps == 3



# -- 12. calibrating for the steps the trainer takes ------------------------------------------
class Pairs(Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_hugging_face_calibrates_for_max_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    from privgrad.integrations.huggingface import DPTrainer

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 2)

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=1,
        max_steps=12, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True)
    trainer = DPTrainer(model=Model(), args=args, train_dataset=Pairs(), target_epsilon=3.0,
                        target_delta=DELTA, max_grad_norm=1.0)
    trainer.train()
    assert trainer.engine.steps == 12  # three epochs of 4 steps, as max_steps says
    assert trainer.engine.get_epsilon(DELTA) <= 3.0 * (1 + 1e-6)


@_lightning
def test_lightning_calibrates_for_max_steps(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from privgrad.integrations.lightning import DPCallback

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 2)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dp = DPCallback(target_epsilon=3.0, target_delta=DELTA, max_grad_norm=1.0)
    trainer = pl.Trainer(max_steps=12, max_epochs=100, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[dp])
    data = TensorDataset(torch.randn(64, 6), torch.randint(0, 2, (64,)))
    trainer.fit(Model(), DataLoader(data, batch_size=16))
    assert dp.engine.steps == 12
    assert 2.9 < dp.engine.get_epsilon(DELTA) <= 3.0 * (1 + 1e-6)  # spent for 12 steps, not 400


def test_calibration_takes_steps_as_well_as_epochs():
    def calibrated(**horizon):
        model = nn.Linear(3, 1)
        engine = PrivacyEngine()
        engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(40, 3)), batch_size=10),
            target_epsilon=2.0, target_delta=DELTA, max_grad_norm=1.0, **horizon)
        return engine.settings.noise_multiplier

    assert calibrated(steps=12) == calibrated(epochs=3)  # q = 1/4: 4 steps an epoch
    with pytest.raises(ConfigError, match="exactly one of epochs and steps"):
        calibrated(epochs=3, steps=12)
