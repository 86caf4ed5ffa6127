"""Determinism: outside secure mode two runs after the same ``torch.manual_seed`` are identical,
sampling and noise included; in secure mode they never are (row 13's check is in tests/privacy)."""

from __future__ import annotations

import torch

from tests.privacy import secure_checks
from tests.reliability import checks


def _run(seed: int, **kwargs):
    run = checks.attach(seed, sigma=1.0, **kwargs)
    batches = checks.train(run)
    return batches, {k: v.clone() for k, v in run[0].state_dict().items()}, run[3]


def test_same_seed_same_run():
    (b1, p1, e1), (b2, p2, e2) = _run(0), _run(0)
    assert b1 == b2
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert e1.get_epsilon(1e-5) == e2.get_epsilon(1e-5)


def test_another_seed_another_run():
    (b1, p1, _), (b2, p2, _) = _run(0), _run(1)
    assert b1 != b2 and not torch.equal(p1["head.weight"], p2["head.weight"])


def test_batches_follow_the_sampler_seed_and_noise_the_global_stream():
    """The sampler's seed is drawn at make_private; reseeding afterwards changes the noise (and
    dropout), not the batches."""
    runs = []
    for noise_seed in (10, 11):
        torch.manual_seed(0)
        run = checks.attach(0, sigma=1.0)
        torch.manual_seed(noise_seed)
        runs.append((checks.train(run), run[0].head.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert not torch.equal(runs[0][1], runs[1][1])


def test_secure_runs_never_repeat():
    secure_checks.check_secure_runs_differ(steps=6)
