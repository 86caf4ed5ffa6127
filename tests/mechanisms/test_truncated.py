"""Fixed shapes under correlated noise (issues 22 and 24): ``make_private(...,
mechanism=BandMF(num_bands=b), max_batch_size=M)``.

Cyclic Poisson sampling cut at ``M`` and padded: every batch has ``M`` rows drawn from the
step's group only, the padding adds nothing (sigma 0 against a per-example reference), each
round of the BandMF reduction is accounted as dp-accounting's truncated event over the largest
group (checked independently, with the event's growth in the group size that makes the largest
group the right one), calibration meets the target, resume is exact, and BLT (whose event has no
per-step sampling) is refused.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from privgrad import PrivacyEngine
from privgrad.accounting.events import TruncatedEntry
from privgrad.errors import ConfigError
from privgrad.mechanisms import BLT, BandMF
from privgrad.sampling.cyclic import CyclicPoissonSampler
from privgrad.sampling.truncated import TruncationWarning
from tests.mechanisms.test_engine import BATCH, N, attach, data, params, train

B, M = 4, 16  # 4 groups of about 50 records; p = 10 * 4 / 200 = 0.2, about 10 rows a step


def truncated_reference(sigma: float, rate: float, size: int, m: int, count: int,
                        delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=size, sampling_probability=rate, truncated_batch_size=m,
        noise_multiplier=sigma), count)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(event).get_epsilon(delta)


def largest_group_plus_one(sampler) -> int:
    """Independently of the plan: the sampler's own partition of the records."""
    return int(np.bincount(sampler.group_of(np.arange(N)), minlength=B).max()) + 1


@pytest.mark.filterwarnings("ignore::privgrad.sampling.truncated.TruncationWarning")
def test_each_batch_is_m_rows_of_its_groups_sample_cut_uniformly():
    with pytest.warns(TruncationWarning, match=r"max_batch_size=8 would drop"):
        model, optimizer, engine, dl = attach(BandMF(num_bands=B), steps=40, max_batch_size=8)
    sampler = engine._sampler
    plain = CyclicPoissonSampler(N, sampler.sample_rate, B, bits=sampler.bits,
                                 group_key=sampler.group_key)
    drawn = engine._rows.drawn
    cut = 0
    for step, (x, y, idx) in enumerate(dl):
        real = drawn.real_rows(drawn.delivered)
        full = plain.sample()
        assert x.shape[0] == 8 and real == min(len(full), 8)
        assert set(idx[:real].tolist()) <= set(full.tolist())  # a subset of the group's sample
        assert (sampler.group_of(idx[:real].numpy()) == step % B).all()
        assert (idx[real:] == 0).all()
        cut += len(full) > 8
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert cut >= 3  # (the cut happened; its uniformity is tests/engine/test_fixed_shapes.py's)


def test_each_round_is_dp_accountings_truncated_event_over_the_largest_group():
    model, optimizer, engine, dl = attach(BandMF(num_bands=B), sigma=1.3, steps=14,
                                          max_batch_size=M)
    train(model, optimizer, dl, 14)
    size, rate = largest_group_plus_one(engine._sampler), BATCH * B / N
    (entry,) = engine.accountant.history
    assert entry == TruncatedEntry(1.3, pytest.approx(rate), 4, size, M)  # ceil(14 / 4) rounds
    got, want = engine.get_epsilon(1e-5), truncated_reference(1.3, rate, size, M, 4, 1e-5)
    assert abs(got - want) <= max(0.01, 0.01 * want), (got, want)
    # the cut costs budget here: the untruncated rounds would be cheaper
    untruncated = truncated_reference(1.3, rate, size, 10**6, 4, 1e-5)
    assert got > untruncated + 0.05


def test_the_truncated_event_grows_with_the_group_size():
    """Why the largest group (plus the differing record) bounds every record's round: the
    truncated event's epsilon never falls as its data set grows (the cut becomes likelier)."""
    eps = [truncated_reference(1.0, 0.2, size, M, 3, 1e-5) for size in range(40, 90, 5)]
    assert all(b >= a - 1e-9 for a, b in zip(eps, eps[1:])), eps
    assert eps[-1] > eps[0] + 0.5


def test_calibration_meets_the_target_under_the_truncated_rounds():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    engine = PrivacyEngine()
    _, optimizer, dl = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data(), batch_size=BATCH), target_epsilon=3.0, target_delta=1e-5,
        max_grad_norm=1.0, epochs=2, mechanism=BandMF(num_bands=B), max_batch_size=M)
    n = engine.settings.planned_steps
    train(model, optimizer, dl, n)
    eps = engine.get_epsilon(1e-5)
    assert 2.95 <= eps <= 3.0, eps
    sigma, size = engine.settings.noise_multiplier, largest_group_plus_one(engine._sampler)
    rounds, rate = math.ceil(n / B), BATCH * B / N
    assert abs(truncated_reference(sigma, rate, size, M, rounds, 1e-5) - eps) <= 0.03
    assert truncated_reference(sigma * 0.98, rate, size, M, rounds, 1e-5) > 3.0


def test_padding_adds_nothing_and_each_release_is_its_batchs_clipped_sum():
    """sigma 0, summed loss: ``p.grad`` is the sum over the batch's real rows of each row's
    gradient clipped to C = 1 (a per-example loop), although the padding rows (copies of record
    0) are in the loss with a large weight."""
    model, optimizer, engine, dl = attach(BandMF(num_bands=B), sigma=0.0, steps=12,
                                          max_batch_size=M, loss_reduction="sum")
    drawn, padded = engine._rows.drawn, 0
    for _, (x, y, _idx) in zip(range(12), dl):
        real = drawn.real_rows(drawn.delivered)
        padded += real < M
        twin = nn.Linear(4, 2)  # the reference runs on a copy the engine does not watch
        twin.load_state_dict(model.state_dict())
        want = [torch.zeros_like(p) for p in twin.parameters()]
        for i in range(real):
            g = torch.autograd.grad(nn.functional.cross_entropy(twin(x[i:i + 1]), y[i:i + 1]),
                                    list(twin.parameters()))
            scale = min(1.0, 1.0 / float(torch.sqrt(sum((t ** 2).sum() for t in g))))
            want = [w + scale * t for w, t in zip(want, g)]
        weights = torch.ones(M)
        weights[real:] = 100.0
        optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x), y, reduction="none") * weights).sum().backward()
        optimizer.step()
        for p, w in zip(model.parameters(), want):
            assert torch.allclose(p.grad, w, atol=1e-6), (p.grad, w)
    assert padded >= 10


def test_resume_continues_the_groups_and_the_truncated_accounting_exactly():
    mechanism = BandMF(num_bands=B)
    model, optimizer, engine, dl = attach(mechanism, steps=16, max_batch_size=M)
    train(model, optimizer, dl, 6)
    saved = (engine.state_dict(), {k: v.clone() for k, v in model.state_dict().items()})
    rest = train(model, optimizer, dl, 6)
    expected, history = params(model), engine.accountant.history

    fresh = nn.Linear(4, 2)
    fresh.load_state_dict(saved[1])
    model2, optimizer2, engine2, dl2 = attach(mechanism, seed=99, model=fresh, steps=16,
                                              max_batch_size=M)
    engine2.load_state_dict(saved[0])
    assert engine2._sampling.event_size == largest_group_plus_one(engine2._sampler)
    assert train(model2, optimizer2, dl2, 6) == rest
    assert all(torch.equal(a, b) for a, b in zip(expected, params(model2)))
    assert engine2.accountant.history == history


def test_blt_with_fixed_shapes_is_refused_before_anything_is_attached():
    model = nn.Linear(4, 2)
    with pytest.raises(ConfigError, match=r"max_batch_size works with DP-SGD and BandMF.*"
                                          r"mechanism=BLT\(.*Pass mechanism=BandMF"):
        attach(BLT(num_buffers=2, min_sep=4), model=model, steps=16, max_batch_size=M)
    assert not hasattr(model, "_forward_hooks") or not model._forward_hooks
