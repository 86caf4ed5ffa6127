"""PRIVACY_TESTS.md with a whole user as the unit: add-one-user sensitivity (row 4), the
membership attack (the harness of test_holes.py) on a user with many rows, and its mutant:
the same user under example-level clipping breaks the user-level epsilon. Resume (row 17)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.accounting import epsilon_for
from privgrad.errors import CheckpointError
from tests.privacy import checks
from tests.privacy.test_holes import DELTA, attack, within_dp

C = 0.7


def _user_data(users: int, rows: int, extra: bool, seed: int = 0):
    """``users`` users of ``rows`` rows in random directions; ``extra``: one more user whose
    ``3 * rows`` rows all push the first coordinate (the canary)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(users * rows, 6, generator=g, dtype=torch.float64)
    x[:, 0] = 0.0  # the others leave the canary's coordinate alone
    ids = [u for u in range(users) for _ in range(rows)]
    if extra:
        canary = torch.zeros(3 * rows, 6, dtype=torch.float64)
        canary[:, 0] = 100.0
        x = torch.cat([x, canary])
        ids += [users] * (3 * rows)
    return x, ids


def _engine(x, ids, *, sigma, unit, k, seed, sample_rate=0.5):
    torch.manual_seed(seed)
    model = nn.Linear(6, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="pld")
    extra = {} if unit == "example" else {"privacy_unit": "user", "user_ids": ids,
                                              "max_examples_per_user": k}
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x), batch_size=4),
        noise_multiplier=sigma, max_grad_norm=C, loss_reduction="sum",
        sample_rate=sample_rate, expected_batch_size=4.0, **extra)
    return model, optimizer, engine, dl


def _step(model, optimizer, batch):
    optimizer.zero_grad()
    model(batch).sum().backward()  # each row's gradient is the row itself
    optimizer.step()
    return model.weight.grad.detach().clone().reshape(-1)


def test_adding_one_user_moves_each_update_by_at_most_c():
    """Row 4, a user as the unit: D and D + one user of 15 huge rows, same seeds, sigma = 0."""
    runs = []
    for extra in (False, True):
        x, ids = _user_data(8, 3, extra)
        model, optimizer, _, dl = _engine(x, ids, sigma=0.0, unit="user", k=15, seed=1)
        updates = []
        for _, (batch,) in zip(range(30), checks.forever(dl)):
            updates.append((_step(model, optimizer, batch), bool((batch[:, 0] != 0).any())))
        runs.append(updates)
    sampled = [present for _, present in runs[1]]
    assert any(sampled) and not all(sampled)
    for (a, _), (b, present) in zip(*runs):
        diff = float((b - a).norm())
        if present:
            assert 0.99 * C <= diff <= C * (1 + 1e-9)  # 15 rows of norm 100: C in all
        else:
            assert diff == 0.0


def _member_guess(seed: int, member: bool, unit: str) -> bool:
    """One step at q = 1 over users; the attack: the released first coordinate is large."""
    x, ids = _user_data(6, 4, member, seed)
    model, optimizer, _, dl = _engine(x, ids, sigma=SIGMA, unit=unit, k=12, seed=seed,
                                           sample_rate=1.0)
    (batch,) = next(iter(dl))
    return bool(_step(model, optimizer, batch)[0] > 2.5 * SIGMA * C)


SIGMA = 4.0


@pytest.mark.slow
def test_membership_of_a_whole_user_stays_within_user_level_epsilon():
    """The membership attack of test_holes.py with a user of 12 rows as the canary."""
    n = 300
    tp, fp = attack(lambda s, m: _member_guess(s, m, "user"), n)
    eps = epsilon_for(noise_multiplier=SIGMA, sample_rate=1.0, steps=1, delta=DELTA)
    assert within_dp(tp, fp, n, eps), (tp, fp, eps)


@pytest.mark.slow
def test_mutant_example_level_clipping_lets_a_heavy_user_break_the_user_epsilon():
    """The test has power: clipping each row (example-level) instead of the user's sum lets the
    canary's 12 rows add 12 C, and the same attack beats the user-level epsilon."""
    n = 300
    tp, fp = attack(lambda s, m: _member_guess(s, m, "example"), n)
    eps = epsilon_for(noise_multiplier=SIGMA, sample_rate=1.0, steps=1, delta=DELTA)
    assert not within_dp(tp, fp, n, eps), (tp, fp, eps)


def test_mutant_a_user_split_into_two_units_is_caught(monkeypatch):
    """Mutant of the grouping: give each row its own unit (example-level clipping inside the
    user-level engine). The add-one-user check must fail."""
    from privgrad.engine import groups

    original = groups.Units.of
    monkeypatch.setattr(groups.Units, "of", classmethod(
        lambda cls, labels: original(torch.arange(len(labels)))))
    with pytest.raises(AssertionError):
        test_adding_one_user_moves_each_update_by_at_most_c()


def test_resume_continues_the_user_sampler_and_noise_exactly():
    """Row 17: a user-level run resumed from its state draws the same users, rows and noise."""
    x, ids = _user_data(10, 4, False)

    def run(stop=None, state=None):
        model, optimizer, engine, dl = _engine(x, ids, sigma=1.0, unit="user", k=2, seed=3)
        if state is not None:
            engine.load_state_dict(state[0])
            model.load_state_dict(state[1])
        out = []
        for t, (batch,) in zip(range(8 if state is None else 5), checks.forever(dl)):
            out.append(_step(model, optimizer, batch))
            if t + 1 == stop:
                return out, (engine.state_dict(), model.state_dict())
        return out, None

    full, _ = run()
    first, saved = run(stop=3)
    rest, _ = run(state=saved)
    assert len(first + rest) == 8
    for a, b in zip(full, first + rest):
        assert torch.equal(a, b)


def test_a_user_level_state_resumed_as_example_level_is_refused():
    x, ids = _user_data(10, 4, False)
    _, _, engine, _ = _engine(x, ids, sigma=1.0, unit="user", k=2, seed=4)
    state = engine.state_dict()
    _, _, plain, _ = _engine(x, ids, sigma=1.0, unit="example", k=2, seed=4)
    with pytest.raises(CheckpointError, match=r"privacy setting privacy_unit; got 'user' saved "
                                              r"and 'example' here"):
        plain.load_state_dict(state)
    _, _, other_k, _ = _engine(x, ids, sigma=1.0, unit="user", k=3, seed=4)
    with pytest.raises(CheckpointError, match="max_examples_per_user; got 2 saved and 3 here"):
        other_k.load_state_dict(state)
    assert math.isfinite(engine.get_epsilon(1e-5))
