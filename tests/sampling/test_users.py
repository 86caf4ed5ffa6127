"""The user-level sampler: Poisson over users (row 8 with a user as the unit), at most k rows
of a sampled user, chosen uniformly and independently of the other users, reproducible from
the seed and the step; and the arguments it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.errors import ConfigError, ConfigTypeError
from privgrad.sampling import numpy_bits
from privgrad.sampling.users import UserSampler, user_index
from tests.helpers import mlp
from tests.sampling.test_poisson import poisson_evidence

ALPHA = 1e-3


def test_user_index_groups_rows_by_first_appearance():
    owner, rows = user_index(["b", "a", "b", 3, "a", "b"], 6)
    assert owner.tolist() == [0, 1, 0, 2, 1, 0]
    assert [r.tolist() for r in rows] == [[0, 2, 5], [1, 4], [3]]


def test_users_are_poisson_sampled():
    """Row 8 over users: U = 1,000 users of 1-5 rows, q = 0.05, 4,000 steps."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 1000)
    owner = np.repeat(np.arange(1000), sizes)
    _, rows = user_index(owner, len(owner))
    sampler = UserSampler(rows, 0.05, 3, bits=numpy_bits(1))
    m = np.zeros((4000, 1000), dtype=bool)
    for t in range(4000):
        idx = sampler.sample()
        users = owner[idx]
        assert np.all(np.diff(users) >= 0)  # a user's rows together, users in index order
        counts = np.bincount(users, minlength=1000)
        assert np.all(counts[counts > 0] == np.minimum(sizes[counts > 0], 3))
        m[t, np.unique(users)] = True
        sampler.notes.clear()
    p = poisson_evidence(m, 0.05)
    assert min(p.values()) > ALPHA, p


def test_a_heavy_users_rows_are_chosen_uniformly_and_afresh_each_step():
    rows = [np.arange(10), np.arange(10, 12)]
    sampler = UserSampler(rows, 1.0, 3, bits=numpy_bits(2))
    counts = np.zeros(12)
    chosen = []
    for _ in range(3000):
        idx = sampler.sample()
        counts[idx] += 1
        chosen.append(tuple(idx[:3]))
    assert counts[10] == counts[11] == 3000  # the light user: all rows, every step
    p = stats.chisquare(counts[:10]).pvalue  # each of the heavy user's rows 3/10 of the time
    assert p > ALPHA and abs(counts[:10].mean() - 900) < 1e-9
    assert len(set(chosen)) == 120  # every 3-subset of 10 appears: a fresh choice each step


def test_a_new_user_changes_no_other_users_batches():
    """The coupling the add-one-user tests rely on, and a resumed run's replay: the batches
    depend on (seed, step) and the user's own rows only."""
    rows = [np.arange(4 * u, 4 * u + 4) for u in range(30)]
    a = UserSampler(rows, 0.3, 2, bits=numpy_bits(3))
    b = UserSampler(rows + [np.arange(120, 130)], 0.3, 2, bits=numpy_bits(3))
    for _ in range(50):
        x, y = a.sample(), b.sample()
        assert y[:len(x)].tolist() == x.tolist() and np.all(y[len(x):] >= 120)
    a.step = 7
    c = UserSampler(rows, 0.3, 2, bits=numpy_bits(3))
    c.step = 7
    assert a.sample().tolist() == c.sample().tolist()


def _make(**kwargs):
    model = mlp()
    data = TensorDataset(torch.randn(12, 6))
    arguments = {"module": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                     "data_loader": DataLoader(data, batch_size=4), "noise_multiplier": 1.0,
                     "max_grad_norm": 1.0}
    arguments.update(kwargs)
    engine = PrivacyEngine()
    return engine, engine.make_private(**arguments)


IDS = [i // 2 for i in range(12)]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"privacy_unit": "user", "max_examples_per_user": 2}, ConfigError,
     r"needs one user id per example of the data set; got user_ids=None\. Pass user_ids="),
    ({"privacy_unit": "user", "user_ids": IDS[:-1], "max_examples_per_user": 2}, ConfigError,
     r"one id per example of the data set \(12\); got len\(user_ids\)=11"),
    ({"privacy_unit": "user", "user_ids": [[1]] * 12, "max_examples_per_user": 2}, ConfigTypeError,
     r"hashable and not None; got user_ids\[0\]=\[1\]"),
    ({"privacy_unit": "user", "user_ids": [None] * 12, "max_examples_per_user": 2}, ConfigTypeError,
     r"user_ids\[0\]=None"),
    ({"privacy_unit": "user", "user_ids": "abcdefghijkl", "max_examples_per_user": 2},
     ConfigTypeError, r"user_ids must be a sequence"),
    ({"privacy_unit": "user", "user_ids": IDS, "max_examples_per_user": 0}, ConfigError,
     r"max_examples_per_user=0"),
    ({"privacy_unit": "user", "user_ids": IDS}, ConfigError,
     r"needs max_examples_per_user; got max_examples_per_user=None"),
    ({"privacy_unit": "users", "user_ids": IDS, "max_examples_per_user": 2}, ConfigError,
     r"privacy_unit"),
    ({"user_ids": IDS, "max_examples_per_user": 2}, ConfigError,
     r"user_ids needs privacy_unit='user'; got user_ids=<list of 12 ids>"),
    ({"max_examples_per_user": 2}, ConfigError, r"max_examples_per_user needs privacy_unit"),
    ({"privacy_unit": "user", "user_ids": IDS, "max_examples_per_user": 1,
          "data_loader": DataLoader(TensorDataset(torch.randn(12, 6)), batch_size=8)}, ConfigError,
     (r"batch_size must be at most the rows users can contribute \(6 with "
     r"max_examples_per_user=1\); got batch_size=8")),
    ({"privacy_unit": "user", "user_ids": IDS, "max_examples_per_user": 2, "poisson_sampling": False},
     ConfigError, r"needs privgrad's user-level Poisson sampling"),
    ({"privacy_unit": "user", "user_ids": IDS, "max_examples_per_user": 2, "clipping": "adaptive"},
     ConfigError, r"got clipping='adaptive'"),
])
def test_bad_user_arguments_are_refused_with_the_value_and_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        _make(**kwargs)


def test_fixed_shapes_with_blt_are_refused():
    """(User level with correlated noise works: tests/mechanisms/test_users.py.)"""
    from privgrad.mechanisms import BLT

    with pytest.raises(ConfigError, match=r"max_batch_size works with DP-SGD and BandMF"):
        _make(max_batch_size=6, mechanism=BLT(num_buffers=2, min_sep=2), epochs=2)


def test_user_ids_may_be_a_tensor_or_an_array():
    for ids in (torch.tensor(IDS), np.array(IDS), tuple(IDS)):
        engine, _ = _make(privacy_unit="user", user_ids=ids, max_examples_per_user=2)
        assert engine._sampling.num_users == 6


def test_user_level_q_is_over_users_and_epsilon_matches_dp_accounting():
    import dp_accounting

    ids = [i % 5 for i in range(40)]  # 5 users of 8 rows; k = 4: 20 rows can be drawn
    model = mlp()
    engine = PrivacyEngine()
    _, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(40, 6)), batch_size=8),
        noise_multiplier=1.1, max_grad_norm=1.0, privacy_unit="user", user_ids=ids,
        max_examples_per_user=4)
    assert engine.settings.sample_rate == pytest.approx(8 / 20)
    assert len(dl) == 2 and engine.normaliser() == 8.0
    for _ in range(3):
        for (x,) in dl:
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    assert engine.steps == 6
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.4, dp_accounting.GaussianDpEvent(1.1)), 6)
    assert engine.get_epsilon(1e-3) == pytest.approx(pld.get_epsilon(1e-3), rel=0.01)


def test_calibration_targets_user_level_epsilon():
    ids = [i % 10 for i in range(100)]
    model = mlp()
    engine = PrivacyEngine()
    engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(100, 6)), batch_size=10),
        target_epsilon=2.0, target_delta=1e-3, max_grad_norm=1.0, epochs=3,
        privacy_unit="user", user_ids=ids, max_examples_per_user=2)
    assert engine.settings.sample_rate == pytest.approx(0.5)  # 10 rows of 20 drawable
    from privgrad.accounting import epsilon_for
    eps = epsilon_for(noise_multiplier=engine.settings.noise_multiplier, sample_rate=0.5,
                      steps=6, delta=1e-3)
    assert 1.9 < eps <= 2.0
