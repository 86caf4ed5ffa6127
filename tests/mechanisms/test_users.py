"""User-level privacy with correlated noise: ``make_private(..., privacy_unit="user",
mechanism=BandMF(num_bands=b))`` (or ``BLT``).

Cyclic Poisson sampling over users: the users a step draws are exactly the example-level cyclic
sampler's draw with users as its records (same words, key and groups), a user takes part in at
most one of any ``b`` consecutive steps with at most ``k`` rows, ``b = 1`` is the DP-SGD user
sampler bit for bit; each release with sigma 0 equals the per-user clipped reference; the
accountant records the mechanism's rounds at the group rate over users (against dp-accounting);
calibration meets the target; resume is exact; what cannot be sampled is refused.
"""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.errors import ConfigError
from privgrad.mechanisms import BLT, BandMF
from privgrad.sampling import numpy_bits
from privgrad.sampling.cyclic import CyclicPoissonSampler
from privgrad.sampling.users import CyclicUserSampler, UserSampler, user_index
from tests.engine.test_user_level import CASES, C, reference
from tests.privacy import checks

USERS, ROWS, K, BATCH = 30, 4, 2, 12  # 30 users of 4 rows, k = 2: 60 rows can be drawn
N = USERS * ROWS
IDS = [f"u{(i * 7) % USERS}" for i in range(N)]  # interleaved, not contiguous


def test_the_users_drawn_are_the_cyclic_sample_of_users_with_k_rows_each():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 40)
    owner = np.repeat(np.arange(40), sizes)
    _, rows = user_index(owner, len(owner))
    sampler = CyclicUserSampler(rows, 0.5, 3, 4, bits=numpy_bits(1), group_key=77)
    units = CyclicPoissonSampler(40, 0.5, 4, bits=numpy_bits(1), group_key=77)
    seen_in = {}
    for step in range(24):
        idx = sampler.sample()
        users = owner[idx]
        assert sampler.notes.popleft().tolist() == users.tolist()
        assert np.unique(users).tolist() == units.sample().tolist()  # the same draw of units
        counts = np.bincount(users, minlength=40)
        assert np.all(counts[counts > 0] == np.minimum(sizes[counts > 0], 3))
        for u in np.unique(users).tolist():  # a user's steps are b apart, in its group
            assert seen_in.setdefault(u, step % 4) == step % 4
            assert sampler.group_of(np.array([u]))[0] == step % 4


def test_one_group_is_the_dp_sgd_user_sampler_bit_for_bit():
    rows = [np.arange(5 * u, 5 * u + 5) for u in range(20)]
    cyclic = CyclicUserSampler(rows, 0.3, 2, 1, bits=numpy_bits(4), group_key=5)
    plain = UserSampler(rows, 0.3, 2, bits=numpy_bits(4))
    for _ in range(30):
        assert cyclic.sample().tolist() == plain.sample().tolist()


def attach(mechanism, *, sigma=None, epsilon=None, seed=0, steps=12, model=None, batch=BATCH):
    torch.manual_seed(seed)
    x = torch.randn(N, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    model = model if model is not None else CASES["mlp"].model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 if sigma is None else 0.0)
    engine = PrivacyEngine(accountant="pld")
    common = dict(module=model, optimizer=optimizer, max_grad_norm=C, steps=steps,
                  data_loader=DataLoader(TensorDataset(x, y, torch.arange(N)), batch_size=batch),
                  loss_reduction="sum", privacy_unit="user", user_ids=IDS,
                  max_examples_per_user=K, mechanism=mechanism)
    if epsilon is None:
        _, _, dl = engine.make_private(noise_multiplier=1.0 if sigma is None else sigma,
                                       **common)
    else:
        _, _, dl = engine.make_private_with_epsilon(target_epsilon=epsilon, target_delta=1e-5,
                                                    **common)
    return model, optimizer, engine, dl


def train(model, optimizer, dl, steps):
    drawn = []
    for _, (x, y, idx) in zip(range(steps), checks.forever(dl)):
        optimizer.zero_grad()
        (CASES["mlp"].losses(model(x), y) * 20.0).sum().backward()
        optimizer.step()
        drawn.append(idx.tolist())
    return drawn


def test_each_release_is_the_per_user_clipped_sum_of_its_groups_users():
    model, optimizer, engine, dl = attach(BandMF(num_bands=3), sigma=0.0)
    assert isinstance(engine._sampler, CyclicUserSampler)
    assert engine.settings.sample_rate == pytest.approx(3 * BATCH / (USERS * K))
    weights = torch.full((N,), 20.0, dtype=torch.float64)
    owner, _ = user_index(IDS, N)  # the sampler's numbering of the users
    for step, (x, y, idx) in zip(range(9), checks.forever(dl)):
        labels = [IDS[i] for i in idx.tolist()]
        assert all(labels.count(u) <= K for u in labels)
        assert set(engine._sampler.group_of(owner[idx.numpy()]).tolist()) <= {step % 3}
        optimizer.zero_grad()
        (CASES["mlp"].losses(model(x), y) * weights[idx]).sum().backward()
        optimizer.step()
        got = {name: p.grad.clone() for name, p in model.named_parameters()}
        want = reference(model, CASES["mlp"], x, y, weights[idx],
                         torch.tensor([int(u[1:]) for u in labels]))
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mechanism", [BandMF(num_bands=3), BLT(num_buffers=2, min_sep=3)],
                         ids=["bandmf", "blt"])
def test_the_accountant_records_the_mechanisms_event_over_users(mechanism):
    model, optimizer, engine, dl = attach(mechanism, sigma=1.3)
    train(model, optimizer, dl, 12)
    p = 3 * BATCH / (USERS * K)  # 3 groups of users, each drawn at 3x the DP-SGD user rate
    (entry,) = engine.accountant.history
    if isinstance(mechanism, BandMF):
        assert (entry.noise_multiplier, entry.num_steps) == (1.3, 4)  # ceil(12 / 3) rounds
        assert entry.sample_rate == pytest.approx(p)
        event = dp_accounting.PoissonSampledDpEvent(p, dp_accounting.GaussianDpEvent(1.3))
        count = 4
    else:  # one Gaussian mechanism for the whole run
        assert (entry.noise_multiplier, entry.sample_rate, entry.num_steps) == (1.3, 1.0, 1)
        event, count = dp_accounting.GaussianDpEvent(1.3), 1
    pld = dp_accounting.pld.PLDAccountant().compose(event, count)
    assert engine.get_epsilon(1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)


def test_calibration_meets_a_user_level_target():
    _, _, engine, _ = attach(BandMF(num_bands=3), epsilon=4.0, steps=30)
    sigma = engine.settings.noise_multiplier
    p = 3 * BATCH / (USERS * K)
    event = dp_accounting.PoissonSampledDpEvent(p, dp_accounting.GaussianDpEvent(sigma))
    reached = dp_accounting.pld.PLDAccountant().compose(event, 10).get_epsilon(1e-5)
    assert 3.9 < reached <= 4.0 + 1e-6


def test_resume_continues_the_groups_batches_and_parameters_exactly():
    mechanism = BandMF(num_bands=3)
    model, optimizer, engine, dl = attach(mechanism, sigma=0.5)
    train(model, optimizer, dl, 5)
    saved = (engine.state_dict(), {k: v.clone() for k, v in model.state_dict().items()})
    rest = train(model, optimizer, dl, 6)
    expected, history = [p.detach().clone() for p in model.parameters()], engine.accountant.history

    fresh = CASES["mlp"].model().double()
    fresh.load_state_dict(saved[1])
    model2, optimizer2, engine2, dl2 = attach(mechanism, sigma=0.5, seed=99, model=fresh)
    engine2.load_state_dict(saved[0])
    assert engine2._sampler.group_key == engine._sampler.group_key
    assert train(model2, optimizer2, dl2, 6) == rest
    assert all(torch.equal(a, b) for a, b in zip(expected, model2.parameters()))
    assert engine2.accountant.history == history


def test_groups_that_cannot_be_sampled_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"batch_size \* num_groups must be at most the rows "
                                          r"users can contribute \(60 with max_examples_per_user"
                                          r"=2\).*got batch_size=12\. Use a batch size <= 10"):
        attach(BandMF(num_bands=6))
    with pytest.raises(ConfigError, match=r"groups must not outnumber the users \(30\); got "
                                          r"num_groups=40"):
        attach(BLT(num_buffers=2, min_sep=40), steps=40, batch=2)  # 120 rows: 40 groups fit
