"""The privacy conformance checks of PRIVACY_TESTS.md, as functions that raise AssertionError
when the property fails. ``test_conformance.py`` runs them on the library as it is;
``test_mutants.py`` runs them on deliberately broken variants and requires them to fail.

Statistical checks use fixed seeds and alpha = 1e-3 per p-value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from tests.helpers import drawn

ALPHA = 1e-3
SIGMA, C = 1.3, 0.7


def forever(loader):
    """Batches from a fresh pass over ``loader`` every epoch (``itertools.cycle`` would replay
    the first epoch's batches)."""
    while True:
        yield from loader


# -- statistics -------------------------------------------------------------------------------
def gaussian_pvalues(samples: np.ndarray, std: float) -> dict[str, float]:
    """p-values that ``samples`` (steps x coordinates) are i.i.d. N(0, std^2)."""
    x = np.asarray(samples, dtype=np.float64) / std
    n = x.size
    ss = float((x * x).sum())
    p_var = 2 * min(stats.chi2.cdf(ss, n), stats.chi2.sf(ss, n))
    flat = x.ravel()
    p_ks = stats.kstest(flat[: min(n, 50_000)], "norm").pvalue
    p_mean = 2 * stats.norm.sf(abs(flat.mean()) * math.sqrt(n))
    if x.shape[0] > 1:
        products = (x[1:] * x[:-1]).ravel()
        p_lag = 2 * stats.norm.sf(abs(products.mean()) * math.sqrt(products.size))
    else:
        p_lag = 1.0
    return {"variance": p_var, "normality": p_ks, "mean": p_mean, "lag1": p_lag}


def assert_gaussian(samples: np.ndarray, std: float, what: str = "") -> None:
    if std == 0 or not np.isfinite(samples).all():
        raise AssertionError(f"{what}: noise is degenerate (std={std}, finite={np.isfinite(samples).all()})")
    p = gaussian_pvalues(samples, std)
    assert min(p.values()) > ALPHA, f"{what}: {p}"


# -- rows 1, 2, 9: the noise ------------------------------------------------------------------
def zero_gradient_steps(model: nn.Module, optimizer, loader, steps: int, engine: PrivacyEngine,
                        names=None) -> dict[str, np.ndarray]:
    """Run ``steps`` private steps whose per-sample gradients are all zero; return ``p.grad``
    of every named parameter, one row per step."""
    names = names or dict(model.named_parameters())
    out = {n: [] for n in names}
    for _, batch in zip(range(steps), forever(loader)):
        optimizer.zero_grad()
        x = batch[0]
        (model(x).sum() * 0.0).backward()
        optimizer.step()
        for n, p in names.items():
            assert p.grad is not None, f"{n}: the step released no gradient (so no noise) for it"
            out[n].append(p.grad.detach().reshape(-1).double().numpy().copy())
    return {n: np.stack(v) for n, v in out.items()}


def check_noise_distribution(reduction: str = "mean", steps: int = 200) -> None:
    """Row 1: N(0, (sigma C / expected batch size)^2) per coordinate, >= 1,000 coordinates."""
    torch.manual_seed(1)
    model = nn.Linear(40, 25)
    data = TensorDataset(torch.randn(100, 40))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(data, batch_size=10),
                                   noise_multiplier=SIGMA, max_grad_norm=C, loss_reduction=reduction)
    grads = zero_gradient_steps(model, optimizer, dl, steps, engine)
    std = SIGMA * C / (10.0 if reduction == "mean" else 1.0)
    assert_gaussian(grads["weight"], std, f"weight ({reduction})")
    assert engine.accountant.steps == steps


class TiedModel(nn.Module):
    """Tied input/output embedding, a layer frozen at attach time, and a head in its own group."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.mid = nn.Linear(6, 6)
        self.frozen = nn.LayerNorm(6)
        self.out = nn.Linear(6, 12, bias=False)
        self.out.weight = self.emb.weight
        self.extra = nn.Linear(12, 4)

    def forward(self, idx):
        h = self.frozen(torch.tanh(self.mid(self.emb(idx)))).mean(1)
        return self.extra(self.out(h))


def check_noise_on_every_parameter(mode: str, steps: int = 300) -> None:
    """Row 2: every trainable parameter (tied, several groups, frozen then unfrozen) gets the
    noise exactly once."""
    torch.manual_seed(2)
    model = TiedModel()
    model.frozen.requires_grad_(False)
    optimizer = torch.optim.SGD([
        {"params": [model.emb.weight, model.mid.weight, model.mid.bias, *model.frozen.parameters()]},
        {"params": list(model.extra.parameters()), "lr": 0.0},
    ], lr=0.0)
    data = TensorDataset(torch.randint(0, 12, (60, 5)))
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(data, batch_size=6),
                                   noise_multiplier=SIGMA, max_grad_norm=C, loss_reduction="sum",
                                   grad_sample_mode=mode)
    model.frozen.requires_grad_(True)  # unfrozen after attaching: must be privatised too
    grads = zero_gradient_steps(model, optimizer, dl, steps, engine)
    assert set(grads) == {"emb.weight", "mid.weight", "mid.bias", "frozen.weight",
                          "frozen.bias", "extra.weight", "extra.bias"}
    for name, g in grads.items():
        assert_gaussian(g, SIGMA * C, f"{mode}: {name}")


def check_empty_batches_are_noised_and_counted(steps: int = 300) -> None:
    """Row 9: with q N << 1 almost every batch is empty; each still gets the full noise and
    counts as a step."""
    torch.manual_seed(3)
    model = nn.Linear(8, 4)
    data = TensorDataset(torch.randn(50, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(data, batch_size=1),
                                   noise_multiplier=SIGMA, max_grad_norm=C,
                                   sample_rate=0.002, expected_batch_size=0.1)
    sizes = []
    grads = {"weight": [], "bias": []}
    for _, (x,) in zip(range(steps), forever(dl)):
        sizes.append(len(x))
        optimizer.zero_grad()
        (model(x).sum() * 0.0).backward()
        optimizer.step()
        grads["weight"].append(model.weight.grad.reshape(-1).double().numpy().copy())
        grads["bias"].append(model.bias.grad.double().numpy().copy())
    assert sizes.count(0) > 0.8 * steps
    for name, g in grads.items():
        assert_gaussian(np.stack(g), SIGMA * C / 0.1, f"empty batches: {name}")
    assert engine.accountant.steps == steps and engine.steps == steps


# -- rows 3, 4, 7: clipping and sensitivity ---------------------------------------------------
@dataclass
class Case:
    """A model, a batch maker and a per-example loss (so one record can be made huge)."""

    name: str
    model: callable
    inputs: callable  # (n, generator) -> (x, y)
    losses: callable  # (output, y) -> (n,) per-example losses


def _cls(out, y):
    return F.cross_entropy(out, y, reduction="none")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4),
                                  nn.ReLU(inplace=True))
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class BagModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 5, mode="mean")
        self.norm = nn.RMSNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        return self.head(self.norm(self.bag(idx)))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(x * self.scale))


CASES = [
    Case("mlp", lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
         lambda n, g: (torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), _cls),
    Case("conv", ConvNet,
         lambda n, g: (torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)), _cls),
    Case("bag", BagModel,
         lambda n, g: (torch.randint(0, 20, (n, 7), generator=g), torch.randint(0, 3, (n,), generator=g)), _cls),
    Case("tied", TiedModel,
         lambda n, g: (torch.randint(0, 12, (n, 5), generator=g), torch.randint(0, 4, (n,), generator=g)),
         _cls),
    Case("generic", Custom,
         lambda n, g: (torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), _cls),
]


def _attach(case: Case, mode: str, clipping: str = "flat", sigma: float = 0.0, model=None):
    model = model if model is not None else case.model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    data = TensorDataset(torch.zeros(100, 1))
    engine.make_private(module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=10),
                        noise_multiplier=sigma, max_grad_norm=C, clipping=clipping,
                        loss_reduction="sum", grad_sample_mode=mode)
    return model, optimizer, engine


def _update(model, optimizer, case, x, y, weights) -> dict[str, torch.Tensor]:
    optimizer.zero_grad()
    (case.losses(model(x), y) * weights).sum().backward()
    optimizer.step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _cast(x):
    return x.double() if x.is_floating_point() else x


def check_clipping_bound(case: Case, mode: str, clipping: str = "flat") -> None:
    """Row 3: one record with a huge gradient contributes at most C (and, being huge, about C);
    per-layer: at most C_k per parameter."""
    g = torch.Generator().manual_seed(4)
    model, optimizer, engine = _attach(case, mode, clipping)
    x, y = case.inputs(7, g)
    x = _cast(x)
    weights = torch.ones(7, dtype=torch.float64)
    weights[3] = 1e4  # record 3's gradient is huge
    keep = torch.arange(7) != 3
    # the engine self-checks its first backward pass (on autograd's own backward); later passes
    # take the fast paths: the bound must hold on both (lr = 0: the model stays the same)
    for when in ("first steps", "later steps"):
        drawn(engine, len(x))
        with_x = _update(model, optimizer, case, x, y, weights)
        drawn(engine, int(keep.sum()))
        without_x = _update(model, optimizer, case, x[keep], y[keep], weights[keep])
        diff = {n: with_x[n] - without_x[n] for n in with_x}
        total = math.sqrt(sum(float(d.square().sum()) for d in diff.values()))
        what = f"{case.name}/{mode}/{clipping}, {when}"
        assert total <= C * (1 + 1e-5), f"{what}: contribution {total} > C={C}"
        if clipping != "per_layer":  # flat, or automatic: C ||g|| / (||g|| + gamma) ~ C
            assert total >= 0.99 * C, f"{what}: huge record contributed only {total}"
        else:
            bound = engine._clipped.bounds
            names = {p: n for n, p in model.named_parameters()}
            for p, c_k in bound.items():
                norm = float(diff[names[p]].norm())
                assert norm <= c_k * (1 + 1e-5), f"{what}: {names[p]} {norm} > {c_k}"
            assert abs(math.sqrt(sum(c * c for c in bound.values())) - C) < 1e-12


def check_add_one_sensitivity(case: Case, mode: str, steps: int = 25, clipping: str = "flat",
                              mechanism=None) -> None:
    """Row 4: data sets D and D + x, same seed, sigma = 0: each step's updates differ by at most
    C, and by exactly 0 at the steps where x is not sampled (``mechanism``: a correlated-noise
    mechanism, planned for ``steps``)."""
    g = torch.Generator().manual_seed(5)
    x_all, y_all = case.inputs(31, g)
    x_all = _cast(x_all)
    weights = torch.ones(31, dtype=torch.float64)
    weights[30] = 1e4  # x is the last record, with a huge gradient
    runs = []
    for n in (30, 31):
        torch.manual_seed(6)  # same sampler seed for both runs
        model = case.model().double()
        torch.manual_seed(7)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        engine = PrivacyEngine(accountant="rdp")
        data = TensorDataset(x_all[:n], y_all[:n], torch.arange(n))
        torch.manual_seed(8)
        _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                       data_loader=DataLoader(data, batch_size=6),
                                       noise_multiplier=0.0, max_grad_norm=C, loss_reduction="sum",
                                       sample_rate=0.2, expected_batch_size=6.0, grad_sample_mode=mode,
                                       clipping=clipping, mechanism=mechanism,
                                       steps=steps if mechanism is not None else None)
        updates, members = [], []
        for _, (x, y, idx) in zip(range(steps), forever(dl)):
            updates.append(_update(model, optimizer, case, x, y, weights[idx]))
            members.append(30 in idx.tolist())
        runs.append((updates, members))
    (base, _), (added, sampled) = runs
    assert any(sampled) and not all(sampled)
    for t, (a, b, present) in enumerate(zip(base, added, sampled)):
        diff = math.sqrt(sum(float((b[n] - a[n]).square().sum()) for n in a))
        if present:
            assert diff <= C * (1 + 1e-5), f"{case.name}/{mode} step {t}: {diff} > C"
        else:
            assert diff == 0.0, f"{case.name}/{mode} step {t}: x not sampled, yet updates differ by {diff}"


def check_non_finite_record(case: Case, mode: str, clipping: str = "flat") -> None:
    """Row 7: a record with a NaN or inf loss is dropped: the update is finite and equals the
    update without it; the drop is counted."""
    g = torch.Generator().manual_seed(9)
    model, optimizer, engine = _attach(case, mode, clipping)
    x, y = case.inputs(6, g)
    x = _cast(x)
    keep = torch.arange(6) != 2
    for bad in (float("nan"), float("inf")):
        weights = torch.ones(6, dtype=torch.float64)
        weights[2] = bad
        drawn(engine, len(x))
        with_bad = _update(model, optimizer, case, x, y, weights)
        assert engine.last_step_stats.dropped == 1
        drawn(engine, int(keep.sum()))
        without = _update(model, optimizer, case, x[keep], y[keep], weights[keep])
        for n in with_bad:
            assert torch.isfinite(with_bad[n]).all(), f"{case.name}/{mode}: {n} not finite"
            assert torch.allclose(with_bad[n], without[n], rtol=1e-9, atol=1e-12), n
    if x.is_floating_point():  # a NaN input
        x = x.clone()
        x[2] = float("nan")
        weights = torch.ones(6, dtype=torch.float64)
        drawn(engine, len(x))
        update = _update(model, optimizer, case, x, y, weights)
        assert all(torch.isfinite(u).all() for u in update.values())


# -- row 10: the data set's size stays private when declared so -------------------------------
def check_size_independent(batch_size: int = 8) -> None:
    """Row 10: explicit sample_rate and expected_batch_size on N and N+1 records give identical
    q, normaliser and steps per epoch."""
    seen = []
    for n in (200, 201):
        model = nn.Linear(3, 2)
        engine = PrivacyEngine(accountant="rdp")
        _, _, dl = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(n, 3)), batch_size=batch_size),
            noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.04, expected_batch_size=8.0)
        seen.append((engine.settings.sample_rate, engine.normaliser(), len(dl)))
    assert seen[0] == seen[1], f"depends on the data set's size: {seen}"
    assert seen[0] == (0.04, 8.0, 25)


# -- row 11: virtual batches ------------------------------------------------------------------
def check_virtual_batches(mode: str = "auto") -> None:
    """Row 11: K physical chunks per logical step equal one big batch (sigma = 0), each example
    is clipped once, one noise draw per logical step, and the accountant counts logical steps."""
    case = CASES[0]
    g = torch.Generator().manual_seed(10)
    x, y = case.inputs(64, g)
    x = x.double()
    data = TensorDataset(x, y)
    results = []
    for physical in (None, 5):
        torch.manual_seed(11)
        model = case.model().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        engine = PrivacyEngine(accountant="rdp")
        torch.manual_seed(12)
        _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                       data_loader=DataLoader(data, batch_size=16),
                                       noise_multiplier=0.0, max_grad_norm=0.05,
                                       grad_sample_mode=mode)
        sizes, clipped_once = [], []
        if physical is None:
            for xb, yb in dl:
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
        else:
            with engine.virtual_batches(dl, max_physical_batch_size=physical) as chunks:
                for xb, yb in chunks:
                    assert len(xb) <= physical
                    sizes.append(len(xb))
                    optimizer.zero_grad()
                    F.cross_entropy(model(xb), yb).backward()
                    optimizer.step()
                    if engine._release_now:  # this chunk closed its logical batch
                        clipped_once.append(engine.last_step_stats.examples == sum(sizes))
                        sizes = []
            assert clipped_once and all(clipped_once), "an example was clipped more than once"
        results.append(([p.detach().clone() for p in model.parameters()], engine.steps,
                        engine.accountant.steps))
    (big, steps_big, acc_big), (virtual, steps_virtual, acc_virtual) = results
    assert steps_big == steps_virtual == acc_big == acc_virtual == 4
    for a, b in zip(big, virtual):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), "virtual batches changed the update"

    # one noise draw per logical step, whatever the number of chunks
    torch.manual_seed(13)
    model = case.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(TensorDataset(x.float(), y), batch_size=16),
                                   noise_multiplier=SIGMA, max_grad_norm=C, loss_reduction="sum")
    draws = []
    original = engine.noise.fill

    def counting(out, std):
        draws.append(out.numel())
        return original(out, std)

    engine.noise.fill = counting
    grads = []
    for _ in range(40):
        with engine.virtual_batches(dl, max_physical_batch_size=3) as chunks:
            for xb, yb in chunks:
                optimizer.zero_grad()
                (model(xb).sum() * 0.0).backward()
                optimizer.step()
                if engine._release_now:
                    grads.append(model[0].weight.grad.reshape(-1).double().numpy().copy())
    # all parameters (one dtype, one device) are drawn together: one draw of every element
    n_elements = sum(p.numel() for p in model.parameters())
    assert draws == [n_elements] * engine.steps and engine.steps == 160
    assert_gaussian(np.stack(grads), SIGMA * C, "virtual batches: noise")


# -- row 8 through the engine's own loader ----------------------------------------------------
def check_engine_loader_is_poisson(steps: int = 4000) -> None:
    """Row 8 on the loader ``make_private`` returns: N = 1,000, q = 0.05."""
    from tests.helpers import Indexed
    from tests.sampling.test_poisson import poisson_evidence

    torch.manual_seed(14)
    model = nn.Linear(1, 1)
    engine = PrivacyEngine(accountant="rdp")
    _, _, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   data_loader=DataLoader(Indexed(1000), batch_size=50),
                                   noise_multiplier=1.0, max_grad_norm=1.0)
    m = np.zeros((steps, 1000), dtype=bool)
    for t, idx in zip(range(steps), forever(dl)):
        m[t, idx.numpy()] = True
    evidence = poisson_evidence(m, 0.05)
    assert min(evidence.values()) > ALPHA, evidence


# -- calibration, end to end ------------------------------------------------------------------
def check_epsilon_target(target: float = 2.0, epochs: int = 3) -> None:
    """make_private_with_epsilon: after the planned epochs, epsilon is at most the target."""
    torch.manual_seed(15)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    data = TensorDataset(torch.randn(400, 4), torch.randint(0, 2, (400,)))
    _, _, dl = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=20),
        target_epsilon=target, target_delta=1e-5, epochs=epochs, max_grad_norm=1.0)
    for _ in range(epochs):
        for x, y in dl:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    eps = engine.get_epsilon(1e-5)
    assert eps <= target, f"spent epsilon {eps} > target {target}"
