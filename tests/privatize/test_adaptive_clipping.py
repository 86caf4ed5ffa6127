"""Quantile-based adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021).

Each step also releases the centred count of examples whose norm was within the bound,
``sum_b (1[||g_b|| <= C_t] - 1/2) + N(0, sigma_b^2)`` (sensitivity 1/2), and moves the bound
geometrically toward the target quantile: ``C_{t+1} = C_t exp(-lr (estimate - target))`` with
``estimate = noisy count / m + 1/2`` (``m`` the expected batch size). The gradient's noise
multiplier is raised to ``z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, so that the pair is one
Gaussian mechanism with the requested ``z``: the accountant records plain DP-SGD's event.

The bound trajectory is checked against a reference that recomputes every step from a one-example
loop and the count-noise draws the engine made; the estimate's bias and variance statistically;
the per-step sensitivity of both releases; the accounting against dp_accounting.
"""

from __future__ import annotations

import copy
import csv
import math

import dp_accounting
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.errors import ConfigError
from privgrad.monitoring import PrivacyLogger
from privgrad.privatize import TorchGaussian
from privgrad.privatize.adaptive import default_count_noise, gradient_noise_multiplier
from tests.helpers import drawn
from tests.privacy.checks import ALPHA, assert_gaussian, forever

MODES = ["auto", "ghost", "materialize"]
N, BATCH = 60, 12  # q = 0.2, m = 12


class Recording(TorchGaussian):
    """PyTorch's noise, recording the draws added to the counts (the gradients' noise is drawn
    by ``sample_many``, so every ``add_noise`` call is a count release)."""

    def __init__(self, *args, draws=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws = draws if draws is not None else []

    def seeded(self, seed):
        return Recording(self.parallel_min, seed=seed, draws=self.draws)

    def add_noise(self, total, std):
        out = super().add_noise(total, std)
        self.draws.append(((out - total).tolist(), std))
        return out


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, N, dtype=torch.float64)[:, None]
    return TensorDataset(x, torch.randint(0, 3, (N,), generator=g), torch.arange(N))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def attach(net, noise=None, sigma=1.0, seed=1, max_grad_norm=0.05, **options):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)  # the model stays put: norms are fixed
    engine = PrivacyEngine(accountant="rdp", noise=noise)
    torch.manual_seed(seed)
    options = {"clipping": "adaptive", "target_quantile": 0.5, "quantile_lr": 0.3, **options}
    _, _, dl = engine.make_private(module=net, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=sigma, max_grad_norm=max_grad_norm, **options)
    return engine, optimizer, dl


def norms(net, dataset, per_param=False) -> torch.Tensor:
    """Each example's gradient norm of its own summed loss, one example at a time: ``(N,)``, or
    ``(N, parameters)`` per parameter."""
    out = []
    for x, y, _ in DataLoader(dataset, batch_size=1):
        loss = nn.functional.cross_entropy(net(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, list(net.parameters()))
        each = [math.sqrt(float(g.square().sum())) for g in grads]
        out.append(each if per_param else math.sqrt(sum(n * n for n in each)))
    return torch.tensor(out, dtype=torch.float64)


def train(engine, optimizer, dl, net, steps, on_step=None):
    done = 0
    while done < steps:
        for x, y, i in dl:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            if on_step is not None:
                on_step(i)
            done += 1
            if done == steps:
                return


@pytest.mark.parametrize("mode", MODES)
def test_the_bound_follows_the_quantile_update(mode):
    net = model()
    reference_norms = norms(copy.deepcopy(net), data())
    noise = Recording()
    engine, optimizer, dl = attach(net, noise=noise, grad_sample_mode=mode)
    batches = []
    train(engine, optimizer, dl, net, 25, on_step=lambda i: batches.append(i))
    # the default: the paper's m / 20, but at least z (m = 12 here: z = 1 wins), so that the
    # gradient's noise grows by at most 15%
    sigma_b = 1.0
    assert engine.adaptive_clipping.count_noise_std == sigma_b == default_count_noise(BATCH, 1.0)
    assert default_count_noise(400, 1.0) == 20.0
    assert [std for _, std in noise.draws] == [sigma_b] * 25
    bound, bounds, estimates = 0.05, [], []
    for i, ((draw,), _) in zip(batches, noise.draws):
        bounds.append(bound)
        within = int((reference_norms[i] <= bound).sum())
        estimate = (within - len(i) / 2 + draw) / BATCH + 0.5
        estimates.append(estimate)
        bound *= math.exp(-0.3 * (estimate - 0.5))
    np.testing.assert_allclose(engine.adaptive_clipping.bounds, bounds, rtol=1e-12)
    np.testing.assert_allclose(engine.adaptive_clipping.estimates, estimates, rtol=1e-9, atol=1e-12)
    assert engine.clipping_bound == pytest.approx(bound, rel=1e-12)
    median = float(reference_norms.median())
    assert bounds[0] < median / 5 and abs(math.log(engine.clipping_bound / median)) < math.log(3)


def test_the_gradient_noise_is_raised_to_keep_the_pair_at_z():
    """Zero per-sample gradients: each step's noise is N(0, (z_grad C_t / m)^2) on the clipped
    sum, released in units of the bound C_t the step used: N(0, (z_grad / m)^2)."""
    net = model()
    engine, optimizer, dl = attach(net, sigma=0.8, quantile_lr=0.5)
    z_grad = gradient_noise_multiplier(0.8, 0.8)  # the default count noise: max(m / 20, z)
    assert z_grad == pytest.approx(0.8 / math.sqrt(0.75))
    assert z_grad > 0.8
    assert 1 / z_grad**2 + 1 / (2 * 0.8) ** 2 == pytest.approx(1 / 0.8**2, rel=1e-12)
    rows = []
    steps = 0
    while steps < 300:
        for x, y, _ in dl:
            optimizer.zero_grad()
            (net(x).sum() * 0.0).backward()
            optimizer.step()
            rows.append(torch.cat([p.grad.flatten() for p in net.parameters()]).numpy())
            steps += 1
            if steps == 300:
                break
    assert_gaussian(np.stack(rows), z_grad / BATCH, "adaptive gradient noise")
    assert len(set(engine.adaptive_clipping.bounds)) > 100  # the bound did move every step


@pytest.mark.slow
def test_the_estimate_is_unbiased_with_the_predicted_variance():
    """A fixed bound (lr 0) and a fixed model: the released fraction has mean F (the true share
    within the bound) and variance (q (1 - q) N / 4 + sigma_b^2) / m^2 (Poisson count plus noise)."""
    net = model()
    truth = norms(copy.deepcopy(net), data())
    bound = float(truth.quantile(0.3))
    engine, optimizer, dl = attach(net, quantile_lr=0.0, max_grad_norm=bound,
                                   count_noise_std=2.0)
    steps = 2000
    train(engine, optimizer, dl, net, steps)
    est = np.array(engine.adaptive_clipping.estimates)
    assert len(est) == steps and set(engine.adaptive_clipping.bounds) == {bound}
    share = float((truth <= bound).double().mean())
    q = BATCH / N
    variance = (q * (1 - q) * N / 4 + 2.0**2) / BATCH**2
    z = (est.mean() - share) / math.sqrt(variance / steps)
    assert 2 * stats.norm.sf(abs(z)) > ALPHA, (est.mean(), share)
    chi = float(((est - share) ** 2).sum() / variance)
    assert 2 * min(stats.chi2.cdf(chi, steps), stats.chi2.sf(chi, steps)) > ALPHA, (est.var(), variance)


@pytest.mark.parametrize("weight", [1e4, 1e-8], ids=["clipped", "within"])
def test_one_example_moves_each_release_by_its_sensitivity(weight):
    """Data sets D and D + x, same seeds, gradient noise 0, the same bound before each step (the
    bound is public: it is computed from earlier releases). The clipped sums differ by at most
    C_t (the releases, in units of C_t, by at most 1), the estimates by exactly 1 / (2 m) (x,
    huge or tiny, moves the centred count by -1/2 or +1/2), and by nothing when x was not
    sampled."""
    full = data()
    runs = []
    for n in (N - 1, N):
        net = model()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        engine = PrivacyEngine(accountant="rdp")
        torch.manual_seed(4)
        ds = TensorDataset(*(t[:n] for t in full.tensors))
        _, _, dl = engine.make_private(module=net, optimizer=optimizer,
                                       data_loader=DataLoader(ds, batch_size=BATCH),
                                       noise_multiplier=0.0, max_grad_norm=0.05,
                                       clipping="adaptive", count_noise_std=0.5,
                                       loss_reduction="sum", sample_rate=BATCH / N,
                                       expected_batch_size=float(BATCH))
        runs.append((net, optimizer, engine, forever(dl)))
    (net_a, opt_a, eng_a, it_a), (net_b, opt_b, eng_b, it_b) = runs
    scale = torch.ones(N, dtype=torch.float64)
    scale[-1] = weight  # x: the last record, with a huge or a tiny gradient
    present = []
    for _ in range(30):
        eng_b.adaptive_clipping.bound = eng_a.adaptive_clipping.bound
        bound = eng_a.clipping_bound
        grads = []
        for net, opt, it in ((net_a, opt_a, it_a), (net_b, opt_b, it_b)):
            x, y, i = next(it)
            opt.zero_grad()
            losses = nn.functional.cross_entropy(net(x), y, reduction="none")
            (losses * scale[i]).sum().backward()
            opt.step()
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]) * bound)
        present.append(N - 1 in i.tolist())
        diff = float((grads[1] - grads[0]).norm())  # of the clipped sums: releases times C_t
        gap = abs(eng_b.adaptive_clipping.estimates[-1] - eng_a.adaptive_clipping.estimates[-1])
        if present[-1]:  # loss_reduction="sum": the release is the clipped sum itself
            assert diff <= bound * (1 + 1e-6)
            assert weight < 1 or diff >= 0.99 * bound  # a huge x is clipped to about C_t
            assert gap == pytest.approx(1 / (2 * BATCH), rel=1e-9)
        else:
            assert diff == 0.0 and gap == 0.0
    assert any(present) and not all(present)


def test_the_release_is_in_units_of_the_bound():
    """Adaptive clipping divides the release by the bound it clipped at (post-processing by a
    public number): one step's update equals flat clipping's at that bound, divided by it."""
    net, flat_net = model(), model()
    engine, optimizer, dl = attach(net, sigma=0.0, max_grad_norm=0.3, count_noise_std=1.0)
    flat_optimizer = torch.optim.SGD(flat_net.parameters(), lr=0.0)
    flat = PrivacyEngine(accountant="rdp")
    flat.make_private(module=flat_net, optimizer=flat_optimizer,
                      data_loader=DataLoader(data(), batch_size=BATCH), noise_multiplier=0.0,
                      max_grad_norm=0.3)
    x, y, _ = next(iter(dl))  # a batch the adaptive engine's loader drew
    drawn(flat, len(x))       # and declared drawn to the flat one
    for m, opt in ((net, optimizer), (flat_net, flat_optimizer)):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    assert engine.adaptive_clipping.bounds == [0.3]
    for p, q in zip(net.parameters(), flat_net.parameters()):
        torch.testing.assert_close(p.grad, q.grad / 0.3, rtol=1e-12, atol=1e-15)


def test_virtual_batches_count_the_logical_batch_once():
    out = []
    for chunk in (None, 5):
        net = model()
        noise = Recording()
        engine, optimizer, dl = attach(net, noise=noise)
        if chunk is None:
            train(engine, optimizer, dl, net, 10)
        else:
            while engine.steps < 10:
                with engine.virtual_batches(dl, chunk) as chunks:
                    for x, y, _ in chunks:
                        optimizer.zero_grad()
                        nn.functional.cross_entropy(net(x), y).backward()
                        optimizer.step()
                        if engine.steps == 10:
                            break
        assert len(noise.draws) == 10  # one count release per logical step
        out.append(engine.adaptive_clipping.bounds)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-12)


def test_epsilon_is_dp_sgds_at_the_requested_noise():
    net = model()
    engine, optimizer, dl = attach(net, sigma=1.1)
    train(engine, optimizer, dl, net, 20)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(BATCH / N, dp_accounting.GaussianDpEvent(1.1)), 20)
    reference = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(reference, rel=1e-3)


@pytest.mark.parametrize("z, sigma_b", [(0.5, 1.0), (1.0, 3.0), (2.0, 50.0)])
def test_the_split_is_one_gaussian_at_z(z, sigma_b):
    """Without sampling, Gaussian(z_grad) on the sum (sensitivity C) composed with
    Gaussian(sigma_b) on the centred count (sensitivity 1/2) is exactly Gaussian(z)."""
    z_grad = gradient_noise_multiplier(z, sigma_b)
    pair = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_grad),
                                          dp_accounting.GaussianDpEvent(2 * sigma_b)])
    one = dp_accounting.GaussianDpEvent(z)
    eps = [dp_accounting.pld.PLDAccountant().compose(e).get_epsilon(1e-5) for e in (pair, one)]
    assert eps[0] == pytest.approx(eps[1], rel=2e-3)


def test_resume_continues_the_bound_exactly(tmp_path):
    def run(stop_at=None, resume=None):
        net = model()
        engine, optimizer, dl = attach(net, sigma=0.7)
        if resume is not None:
            engine.load_checkpoint(resume, module=net, optimizer=optimizer)
        steps = stop_at if stop_at is not None else 12 - engine.steps
        train(engine, optimizer, dl, net, steps)
        if stop_at is not None:
            engine.save_checkpoint(tmp_path / "run.pt", module=net, optimizer=optimizer)
        return engine

    whole = run()
    run(stop_at=5)
    resumed = run(resume=tmp_path / "run.pt")
    assert resumed.adaptive_clipping.bounds == whole.adaptive_clipping.bounds
    assert resumed.adaptive_clipping.estimates == whole.adaptive_clipping.estimates
    assert resumed.clipping_bound == whole.clipping_bound


def test_secure_mode_draws_the_count_noise_from_the_secure_source(monkeypatch):
    pytest.importorskip("cryptography")
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp", secure_mode=True)
    _, _, dl = engine.make_private(module=net, optimizer=optimizer,
                                   data_loader=DataLoader(data(), batch_size=BATCH),
                                   noise_multiplier=1.0, max_grad_norm=0.05, clipping="adaptive")
    source = type(engine.noise)
    assert source.__name__ == "SecureGaussian"
    sizes, original = [], source.add_noise
    monkeypatch.setattr(source, "add_noise",
                        lambda self, total, std: sizes.append(total.numel()) or original(self, total, std))
    train(engine, optimizer, dl, net, 3)
    assert sizes.count(1) == 3 and len(engine.adaptive_clipping.bounds) == 3


def test_the_log_shows_each_steps_bound_and_estimate(tmp_path):
    net = model()
    engine, optimizer, dl = attach(net)
    log = PrivacyLogger(engine, delta=1e-5, csv_path=tmp_path / "log.csv")
    train(engine, optimizer, dl, net, 6, on_step=lambda i: log.log())
    log.close()
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    adaptive = engine.adaptive_clipping
    assert [float(r["max_grad_norm"]) for r in rows] == adaptive.bounds
    assert [float(r["quantile_estimate"]) for r in rows] == adaptive.estimates
    z_grad = engine.settings.gradient_noise_multiplier
    assert [float(r["noise_std"]) for r in rows] == [z_grad * b for b in adaptive.bounds]


def make(max_grad_norm=1.0, **options):
    net = model()
    return PrivacyEngine().make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=DataLoader(data(), batch_size=BATCH), noise_multiplier=1.0,
        max_grad_norm=max_grad_norm, **options)


@pytest.mark.parametrize("options, message", [
    (dict(target_quantile=0.0), r"target_quantile must be in \(0, 1\); got target_quantile=0\.0"),
    (dict(target_quantile=1.0), r"target_quantile must be in \(0, 1\); got target_quantile=1\.0"),
    (dict(target_quantile=float("nan")), r"target_quantile must be in \(0, 1\)"),
    (dict(count_noise_std=0.0), r"count_noise_std must be > 0 and finite; got count_noise_std=0\.0"),
    (dict(count_noise_std=0.4), r"count_noise_std must exceed noise_multiplier / 2 = 0\.5 .*got count_noise_std=0\.4"),
    (dict(quantile_lr=-0.1), r"quantile_lr must be finite and >= 0; got quantile_lr=-0\.1"),
])
def test_bad_adaptive_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        make(clipping="adaptive", **options)


def test_adaptive_options_need_adaptive_clipping():
    with pytest.raises(ConfigError, match=r"target_quantile is an option of clipping='adaptive'; got target_quantile=0\.5 with clipping='flat'"):
        make(target_quantile=0.5)


def test_per_layer_bounds_are_not_adaptive():
    with pytest.raises(ConfigError, match=r"a list of bounds needs clipping='per_layer'"):
        make(clipping="adaptive", max_grad_norm=[1.0] * 4)


def test_the_default_quantile_is_the_measured_one():
    """0.9, not the paper's median: measured in docs/examples.md (Adult at epsilon 1, in units of
    the bound: the median 0.7-1.3 points behind the best fixed bound, 0.9 within 0.12)."""
    net = model()
    engine = PrivacyEngine()
    engine.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                        data_loader=DataLoader(data(), batch_size=BATCH), noise_multiplier=1.0,
                        max_grad_norm=1.0, clipping="adaptive")
    adaptive = engine.adaptive_clipping
    assert (adaptive.target_quantile, adaptive.lr) == (0.9, 0.2)


# -- the loops careless users write -----------------------------------------------------------
def test_an_empty_batch_still_releases_a_noisy_count():
    """No examples: the count is 0 - 0/2 plus its full noise, the step is accounted, and the bound
    moves by the noise alone (nothing about the empty sample leaks beyond the mechanism)."""
    net = model()
    noise = Recording()
    engine, optimizer, _ = attach(net, noise=noise)
    from tests.helpers import drawn
    drawn(engine, 0)
    optimizer.zero_grad()
    empty = torch.zeros(0, 5, dtype=torch.float64)
    nn.functional.cross_entropy(net(empty), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    optimizer.step()
    ((draw,), std), = noise.draws
    assert engine.steps == 1 and engine.accountant.steps == 1 and std == 1.0
    assert engine.adaptive_clipping.estimates == [pytest.approx(draw / BATCH + 0.5, rel=1e-12)]


def test_a_bound_set_by_hand_waits_for_the_next_logical_step():
    """Inside a virtual batch the step keeps the bound its first chunk clipped at (the noise is
    sized from it); a bound set mid-step applies from the next step; a bad bound is refused."""
    net = model()
    engine, optimizer, dl = attach(net, max_grad_norm=0.05)
    with engine.virtual_batches(dl, 5) as chunks:
        for k, (x, y, _) in enumerate(chunks):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            if k == 0:
                engine.adaptive_clipping.bound = 7.0  # between the first and the last chunk
            optimizer.step()
            if engine.steps == 2:
                break
    assert engine.adaptive_clipping.bounds[0] == 0.05 and engine.adaptive_clipping.bounds[1] == 7.0
    with pytest.raises(ConfigError, match=r"bound must be > 0 and finite; got bound=-1\.0"):
        engine.adaptive_clipping.bound = -1.0


def test_a_state_saved_before_these_settings_existed_still_loads(tmp_path):
    """A flat run's state from before the clipping options were settings (no gamma,
    target_quantile... keys) continues: a missing setting counts as its default, None."""
    net = model()
    engine, optimizer, dl = attach(net, clipping="flat", target_quantile=None, quantile_lr=None)
    train(engine, optimizer, dl, net, 2)
    state = engine.state_dict()
    for key in ("gamma", "target_quantile", "quantile_lr", "count_noise_std"):
        del state["settings"][key]
    state.pop("adaptive_clipping")
    again = model()
    resumed, _, _ = attach(again, clipping="flat", target_quantile=None, quantile_lr=None)
    resumed.load_state_dict(state)
    assert resumed.steps == 2
