"""Truncated Poisson sampling with fixed shapes (max_batch_size=M): every batch has M rows, the
padding rows are provably inert (padded and unpadded releases are equal at sigma 0, in every
mode and layer family, even when a padding row's loss is NaN), the cut is uniform, the
accountant records the truncated event, and the careless loops are refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.accounting.events import TruncatedEntry
from privgrad.errors import ConfigError, PrivacyStateError
from privgrad.sampling.truncated import TruncationWarning
from tests.engine.test_user_level import CASES
from tests.privacy import checks

MODES = ["auto", "ghost", "materialize"]
C = 0.7


def _run(case, mode, max_batch_size, *, steps=6, n=40, pad_weight=1.0):
    """sigma = 0 releases of a few steps; ``pad_weight`` multiplies the padding rows' losses."""
    g = torch.Generator().manual_seed(1)
    x, y = case.inputs(n, g)
    x = x.double() if x.is_floating_point() else x
    torch.manual_seed(2)
    model = case.model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = PrivacyEngine(accountant="rdp")
    torch.manual_seed(3)
    extra = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=0.0,
        max_grad_norm=C, grad_sample_mode=mode, **extra)
    releases, sizes = [], []
    weights = torch.linspace(0.5, 20.0, n, dtype=torch.float64)

    def step(xb, yb):
        w = torch.ones(len(xb), dtype=torch.float64)
        real = engine._rows.drawn.real_rows(engine._rows.drawn.delivered) if extra else len(xb)
        w[real:] = pad_weight
        optimizer.zero_grad()
        loss = checks._cls(model(xb), yb) * w * weights[: len(xb)]
        loss.mean().backward()
        optimizer.step()

    for _, (xb, yb) in zip(range(steps), checks.forever(dl)):
        sizes.append(len(xb))
        step(xb, yb)
        releases.append({k: p.grad.clone() for k, p in model.named_parameters()})
    return releases, sizes, engine


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["mlp", "conv", "bag", "tied", "generic", "tokens"])
def test_padded_and_unpadded_releases_are_identical_at_sigma_zero(case, mode):
    """M above every batch size: the same Poisson batches, the padded ones with padding rows;
    the releases (and so the models) must not differ. Mean loss: the engine's scale is the
    padded batch, the normaliser the expected batch size."""
    padded, sizes, engine = _run(CASES[case], mode, 30)
    plain, plain_sizes, _ = _run(CASES[case], mode, None)
    assert set(sizes) == {30} and max(plain_sizes) < 30
    for a, b in zip(padded, plain):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
    assert all(isinstance(e, TruncatedEntry) for e in engine.accountant.history)


def test_a_non_finite_padding_row_adds_nothing():
    padded, _, engine = _run(CASES["mlp"], "auto", 30, pad_weight=float("nan"))
    plain, _, _ = _run(CASES["mlp"], "auto", None)
    assert engine.dropped_examples == 0  # padding is not data: not counted as dropped
    for a, b in zip(padded, plain):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)


def test_mutant_padding_counted_as_data_is_caught(monkeypatch):
    from privgrad import training_hooks

    monkeypatch.setattr(training_hooks, "real_rows", lambda rows, tags, captures: torch.ones(
        next(iter(captures)).batch_size, dtype=torch.bool))
    with pytest.raises(AssertionError):
        test_padded_and_unpadded_releases_are_identical_at_sigma_zero("mlp", "auto")


def test_truncation_cuts_to_m_uniformly_and_counts_real_rows():
    torch.manual_seed(4)
    n = 60
    data = TensorDataset(torch.arange(n))
    model = torch.nn.Embedding(n, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    with pytest.warns(TruncationWarning, match=r"max_batch_size=10 would drop \d+\.\d% of the"):
        _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                       data_loader=DataLoader(data, batch_size=12),
                                       noise_multiplier=1.0, max_grad_norm=1.0, max_batch_size=10)
    counts = torch.zeros(n)

    def epoch():
        for (idx,) in dl:
            assert len(idx) == 10
            real = engine._rows.drawn.real_rows(engine._rows.drawn.delivered)
            counts[idx[:real]] += 1
            optimizer.zero_grad()
            model(idx).sum().backward()
            optimizer.step()
            assert engine.last_step_stats.examples == real

    for _ in range(40):
        with pytest.warns(TruncationWarning, match=r"dropped \d+\.\d% of the sampled records so "
                                                   r"far \(measured\)"):
            epoch()
    expected = counts.mean()
    assert ((counts - expected).abs() < 5 * expected.sqrt()).all()  # uniform marginals


def test_bad_max_batch_size_is_refused():
    model = torch.nn.Linear(3, 1)
    data = TensorDataset(torch.randn(20, 3))

    def make(**kwargs):
        return PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
            **kwargs)

    with pytest.raises(ConfigError, match=r"max_batch_size=0\. Pass the fixed batch size"):
        make(max_batch_size=0)
    with pytest.raises(ConfigError, match=r"max_batch_size works with privacy_unit='example'"):
        make(max_batch_size=8, privacy_unit="user", user_ids=list(range(20)),
             max_examples_per_user=1)
    with pytest.raises(ConfigError, match="needs privgrad's Poisson sampling"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make(max_batch_size=8, poisson_sampling=False)


def test_a_loop_that_reads_ahead_is_refused_with_fixed_shapes():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(torch.randn(40, 3)), batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, max_batch_size=12)
    batches = iter(dl)
    (first,) = next(batches)
    next(batches)
    with pytest.raises(PrivacyStateError, match="padding taken for data"):
        model(first).sum().backward()
    assert engine.steps == 0


def test_virtual_batches_over_padded_batches_equal_one_pass():
    case = CASES["mlp"]
    results = []
    for physical in (None, 7):
        g = torch.Generator().manual_seed(5)
        x, y = case.inputs(40, g)
        torch.manual_seed(6)
        model = case.model().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine()
        torch.manual_seed(7)
        _, _, dl = engine.make_private(
            module=model, optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(x.double(), y), batch_size=8),
            noise_multiplier=0.0, max_grad_norm=0.1, max_batch_size=20)
        if physical is None:
            for xb, yb in dl:
                optimizer.zero_grad()
                checks._cls(model(xb), yb).mean().backward()
                optimizer.step()
        else:
            with engine.virtual_batches(dl, max_physical_batch_size=physical) as chunks:
                for xb, yb in chunks:
                    optimizer.zero_grad()
                    # each chunk's loss is over the padded batch's rows (mean: over all 20)
                    (checks._cls(model(xb), yb).sum() / 20).backward()
                    optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
        assert engine.steps == 5
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resume_of_a_truncated_run_replays_batches_and_accounting():
    data = TensorDataset(torch.randn(50, 3))

    def engine_and_loader():
        torch.manual_seed(8)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine()
        _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                       data_loader=DataLoader(data, batch_size=5),
                                       noise_multiplier=1.0, max_grad_norm=1.0, max_batch_size=9)
        return model, optimizer, engine, dl

    def steps(model, optimizer, dl, k):
        out = []
        for _, (xb,) in zip(range(k), checks.forever(dl)):
            optimizer.zero_grad()
            model(xb).sum().backward()
            optimizer.step()
            out.append(model.weight.grad.clone())
        return out

    model, optimizer, engine, dl = engine_and_loader()
    full = steps(model, optimizer, dl, 6)
    model, optimizer, engine, dl = engine_and_loader()
    first = steps(model, optimizer, dl, 3)
    saved = (engine.state_dict(), model.state_dict(), optimizer.state_dict())
    model, optimizer, engine, dl = engine_and_loader()
    engine.load_state_dict(saved[0])
    model.load_state_dict(saved[1])
    rest = steps(model, optimizer, dl, 3)
    for a, b in zip(full, first + rest):
        assert torch.equal(a, b)
    assert engine.accountant.history == (TruncatedEntry(1.0, 0.1, 6, 50, 9),)


def test_calibration_with_fixed_shapes_meets_the_target_under_the_truncated_event():
    """A careless make_private_with_epsilon(max_batch_size=M) must not calibrate for the
    untruncated step and then spend more: the epsilon after the planned steps is <= target."""
    from privgrad.accounting import epsilon_for

    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine()
    with pytest.warns(TruncationWarning):
        _, optimizer, dl = engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(400, 3)), batch_size=20),
            target_epsilon=2.0, target_delta=1e-5, max_grad_norm=1.0, epochs=2,
            max_batch_size=22)
    plain = epsilon_for(noise_multiplier=engine.settings.noise_multiplier, sample_rate=0.05,
                        steps=40, delta=1e-5)
    def epoch():
        for (xb,) in dl:
            optimizer.zero_grad()
            model(xb).sum().backward()
            optimizer.step()

    for _ in range(2):
        with pytest.warns(TruncationWarning, match="measured"):
            epoch()
    assert engine.steps == 40 and engine.get_epsilon(1e-5) <= 2.0
    assert plain < 1.9  # the untruncated calibration would have overspent: this one is higher
