"""Reliability properties as checks that raise AssertionError when they fail: exact resume, mixed
precision, skipped steps, non-finite examples, determinism. The tests in this folder run them on
the library; ``tests/privacy/test_mutants.py`` runs them on broken variants and requires them to
fail.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from tests.helpers import drawn

EPOCHS, BATCH, N = 3, 8, 48  # 6 steps per epoch


class Net(nn.Module):
    """Linear layers, an embedding-free MLP with dropout (so the RNG state matters too)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16),
                                  nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


def data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g),
                         torch.arange(n))


def attach(seed: int, *, sigma: float, secure: bool = False, optimizer: str = "adam",
           grad_scaler=None, **kwargs):
    """A fresh model, optimizer, scheduler, engine and private loader, after ``manual_seed``."""
    torch.manual_seed(seed)
    model = Net()
    opt = (torch.optim.Adam(model.parameters(), lr=0.05) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    engine = PrivacyEngine(accountant="rdp", secure_mode=secure)
    _, _, dl = engine.make_private(module=model, optimizer=opt,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=sigma, max_grad_norm=0.5,
                                   grad_scaler=grad_scaler, **kwargs)
    return model, opt, scheduler, engine, dl


def train(run, *, start_epoch: int = 0, stop_after: int | None = None, path=None):
    """Train ``run`` (from :func:`attach`) to the end of epoch ``EPOCHS``; with ``stop_after``,
    save a checkpoint to ``path`` after that many steps of this call and stop. Returns the
    batches taken (lists of record indices)."""
    model, opt, scheduler, engine, dl = run
    model.train()
    batches = []
    for epoch in range(start_epoch, EPOCHS):
        for x, y, idx in dl:
            batches.append(idx.tolist())
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            scheduler.step()
            if stop_after is not None and len(batches) == stop_after:
                engine.save_checkpoint(path, module=model, optimizer=opt, scheduler=scheduler,
                                       extra={"note": f"epoch {epoch}"})
                return batches
    return batches


def check_resume_is_exact(path, *, sigma: float = 0.0, stop_after: int = 8) -> None:
    """A run interrupted after ``stop_after`` steps (mid-epoch by default) and resumed from its
    checkpoint in fresh objects takes the same batches, spends the same epsilon and, outside
    secure mode, ends with bit-for-bit the same parameters as an uninterrupted run."""
    reference = attach(0, sigma=sigma)
    reference_batches = train(reference)

    first = attach(0, sigma=sigma)
    taken = train(first, stop_after=stop_after, path=path)
    resumed = attach(1, sigma=sigma)  # another seed: everything must come from the file
    steps_per_epoch = len(resumed[4])
    extra = resumed[3].load_checkpoint(path, module=resumed[0], optimizer=resumed[1],
                                       scheduler=resumed[2])
    assert extra == {"note": f"epoch {(stop_after - 1) // steps_per_epoch}"}
    # the epoch the next step belongs to; the loader yields what is left of it
    taken += train(resumed, start_epoch=resumed[3].steps // steps_per_epoch)

    assert taken == reference_batches, "the resumed run took other batches"
    ref_engine, engine = reference[3], resumed[3]
    assert engine.steps == ref_engine.steps == len(reference_batches)
    assert engine.accountant.history == ref_engine.accountant.history  # the exact state
    # RDP curves accumulate step by step, so a history replayed from a file sums in another
    # order: the same epsilon up to float rounding.
    assert math.isclose(engine.get_epsilon(1e-5), ref_engine.get_epsilon(1e-5), rel_tol=1e-12)
    for (name, a), b in zip(reference[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"


def one_step_update(model, engine_kwargs, x, y, *, autocast=None, grad_scaler=None):
    """The private gradient (``p.grad`` after ``optimizer.step()``) of one batch, sigma = 0.

    The batch is stepped twice (lr = 0: the model does not move): the engine self-checks the
    first backward pass with autograd's own backward, and the second, whose gradient is
    returned, takes the fast paths (input-only and joint backward) as every later step does."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
                        noise_multiplier=0.0, grad_scaler=grad_scaler, **engine_kwargs)
    for _ in range(2):
        optimizer.zero_grad()
        drawn(engine, len(x))
        if autocast is None:
            loss = F.cross_entropy(model(x), y, reduction="sum")
        else:
            with torch.autocast("cpu", dtype=autocast):
                loss = F.cross_entropy(model(x), y, reduction="sum")
        if grad_scaler is None:
            loss.backward()
            optimizer.step()
        else:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
    engine.detach()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, engine


def mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))


def amp_batch(n: int = 16):
    g = torch.Generator().manual_seed(6)
    return torch.randn(n, 10, generator=g) * 3, torch.randint(0, 4, (n,), generator=g)


def check_amp_matches_float32(dtype: torch.dtype, scale: float | None = None,
                              mode: str = "auto", clipping: str = "flat") -> None:
    """Row-3-style equivalence: the clipped sum under autocast (and a GradScaler of the given
    ``scale``) equals the float32 one within half precision's rounding, and the same examples
    are clipped (the bound sits mid-way through the per-sample norms, 3.5 to 15.8, so a loss
    scale left in the gradients would clip them all)."""
    x, y = amp_batch()
    kwargs = dict(max_grad_norm=7.6, loss_reduction="sum", grad_sample_mode=mode, clipping=clipping)
    if clipping == "adaptive":  # the bound stays put, so both runs clip at 7.6 and count alike
        kwargs["quantile_lr"] = 0.0
    ref, ref_engine = one_step_update(mlp(), kwargs, x, y)
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    got, engine = one_step_update(mlp(), kwargs, x, y, autocast=dtype, grad_scaler=scaler)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm()
        assert err < tol, f"{dtype} scale={scale}: {name} relative error {err:.2e}"
    assert engine.last_step_stats.clipped == ref_engine.last_step_stats.clipped == 8
    assert engine.last_step_stats.dropped == 0
    assert engine.last_step_stats.within == ref_engine.last_step_stats.within == (
        0 if clipping == "automatic" else len(x) - 8)


def check_skipped_step_is_discarded() -> None:
    """With a GradScaler, a backward pass whose ``optimizer.step()`` never ran (the scaler
    skipped it) leaves nothing behind: the next release holds the next batch's examples only."""
    x, y = amp_batch(8)
    kwargs = dict(max_grad_norm=0.3, loss_reduction="sum")
    expected, _ = one_step_update(mlp(), kwargs, x[4:], y[4:])
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
                        noise_multiplier=0.0, grad_scaler=scaler, **kwargs)
    for part, step in ((slice(0, 4), False), (slice(4, 8), True)):
        optimizer.zero_grad()
        drawn(engine, len(x[part]))
        scaler.scale(F.cross_entropy(model(x[part]), y[part], reduction="sum")).backward()
        if step:  # the first pass's step is skipped, as GradScaler does on an inf
            scaler.step(optimizer)
            scaler.update()
    assert engine.last_step_stats.examples == 4, "a skipped step's examples were released"
    assert engine.steps == 1 and engine.accountant.steps == 1
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-5, atol=1e-7), name


def check_non_finite_never_reaches_parameters(bad: float, *, autocast=None, scale=None,
                                              clipping: str = "flat", steps: int = 6) -> None:
    """Row 7 end to end: one record whose loss is ``bad`` (inf or NaN), sampled at most steps,
    never makes a parameter non-finite; each time it is dropped and counted."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    engine = PrivacyEngine(accountant="rdp")
    n = 12
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(TensorDataset(x, y, torch.arange(n)),
                                                          batch_size=6),
                                   noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping,
                                   grad_scaler=scaler)
    seen = dropped = 0
    for _ in range(steps):
        for xb, yb, idx in dl:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                losses = F.cross_entropy(model(xb), yb, reduction="none")
            weights = torch.where(idx == 0, torch.tensor(bad), torch.tensor(1.0))
            loss = (losses.float() * weights).mean()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            present = int((idx == 0).sum())
            seen += present
            dropped += engine.last_step_stats.dropped
            assert engine.last_step_stats.dropped == present, "the bad record was not dropped"
            for name, p in model.named_parameters():
                assert torch.isfinite(p).all(), f"{name} became non-finite"
    assert seen > 0, "the bad record was never sampled: the check proved nothing"
    assert engine.dropped_examples == dropped
