"""Black-box input canaries: seeded inclusion, plain examples in the user's own loop, scores by
loss, and the report they feed (no band, no conformance tests, the kind of canary named)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.auditing import AuditSettings, InputCanaries, evaluate_scores, mislabeled_canaries
from privgrad.auditing.scores import score_candidates
from privgrad.errors import ConfigError, PrivacyStateError

FEATURES, CLASSES = 5, 3


def records(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, FEATURES, generator=g),
                         torch.randint(0, CLASSES, (n,), generator=g))


def test_inclusion_is_seeded_and_fair():
    examples = records(4000)
    a, b = InputCanaries(examples, seed=1), InputCanaries(examples, seed=1)
    assert np.array_equal(a.included, b.included)
    assert not np.array_equal(a.included, InputCanaries(examples, seed=2).included)
    assert abs(a.included.mean() - 0.5) < 5 * 0.5 / np.sqrt(4000)  # 5 standard errors


def test_dataset_is_the_records_then_the_included_canaries():
    canaries = InputCanaries(records(50, seed=1), seed=3)
    train = records(20)
    data = canaries.dataset(train)
    ids = np.flatnonzero(canaries.included)
    assert len(data) == 20 + ids.size
    assert torch.equal(data[0][0], train[0][0])
    for j, i in enumerate(ids):
        assert torch.equal(data[20 + j][0], canaries.examples[i][0])
    x, y = next(iter(DataLoader(data, batch_size=len(data))))  # the default collate, untouched
    assert x.shape == (len(data), FEATURES) and y.shape == (len(data),)
    with pytest.raises(ConfigError, match="records must be a map-style data set"):
        canaries.dataset(iter([]))


def test_mislabeled_canaries_hold_out_their_sources_and_change_every_label():
    data = records(100)
    canaries, rest = mislabeled_canaries(data, 30, num_classes=CLASSES, seed=4)
    assert canaries.num_canaries == 30 and len(rest) == 70
    sources = np.setdiff1d(np.arange(100), rest.indices)
    assert sources.size == 30
    for i, (x, y) in zip(sources, canaries.examples):
        assert torch.equal(x, data[i][0]) and int(y) != int(data[i][1])
    again, _ = mislabeled_canaries(data, 30, num_classes=CLASSES, seed=4)
    assert np.array_equal(again.included, canaries.included)
    assert [int(y) for _, y in again.examples] == [int(y) for _, y in canaries.examples]


@pytest.mark.parametrize("kwargs,match", [
    ({"num_canaries": 100}, r"num_canaries must be < len\(records\) = 100; got num_canaries=100"),
    ({"num_classes": 1}, "num_classes must be >= 2; got num_classes=1"),
    ({"num_classes": 2}, r"labels must be in \[0, num_classes\) = \[0, 2\)"),
])
def test_mislabeled_canaries_refuse_bad_input(kwargs, match):
    args = {"num_canaries": 10, "num_classes": CLASSES, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=match):
        mislabeled_canaries(records(100), args.pop("num_canaries"), **args)


def test_scores_are_the_loss_decrease_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    canaries = InputCanaries(records(40, seed=5), seed=6, batch_size=7)  # several chunks
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.Dropout(0.5), nn.Linear(8, CLASSES))
    x, y = canaries.examples.tensors
    assert "negative loss" in canaries.score_name
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none").double().numpy()
    model.train()
    np.testing.assert_allclose(canaries.scores(model), -before, rtol=1e-6)
    canaries.record_initial_losses(model)
    with torch.no_grad():
        model[0].weight.add_(0.3)
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y, reduction="none").double().numpy()
    model.train()
    np.testing.assert_allclose(canaries.scores(model), before - after, rtol=1e-5, atol=1e-7)
    assert model.training and "loss decrease" in canaries.score_name


def test_a_non_finite_loss_scores_below_every_other_canary():
    losses = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.5, 3.0])
    canaries = InputCanaries(records(6), seed=7, loss_fn=lambda model, batch: losses)
    scores = canaries.scores(nn.Linear(FEATURES, CLASSES))
    np.testing.assert_array_equal(scores, [-1.0, -4.0, -2.0, -4.0, -0.5, -3.0])


def test_a_loss_fn_must_return_one_loss_per_example():
    canaries = InputCanaries(records(6), seed=8, loss_fn=lambda model, batch: torch.zeros(()))
    with pytest.raises(ConfigError, match=r"loss_fn must return one loss per example; got "
                                          r"loss_fn\(...\).shape=\(\) for 6 canaries"):
        canaries.losses(nn.Linear(FEATURES, CLASSES))


def test_report_of_an_ordinary_private_loop():
    torch.manual_seed(1)
    canaries, train = mislabeled_canaries(records(300, seed=2), 100, num_classes=CLASSES, seed=9)
    model = nn.Linear(FEATURES, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(canaries.dataset(train), batch_size=64)
    engine = PrivacyEngine()
    with pytest.raises(PrivacyStateError, match="canaries.report needs an engine that trained"):
        canaries.report(engine, delta=1e-5)
    module, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, sample_rate=0.25, expected_batch_size=0.25 * 250)
    canaries.record_initial_losses(module)
    for x, y in loader:  # the user's loop, nothing added
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
    assert engine.module is model
    report = canaries.report(engine, delta=1e-5)
    s = report.settings
    assert (s.num_canaries, s.steps, s.noise_multiplier) == (100, engine.steps, 1.0)
    assert report.accountant_epsilon == engine.get_epsilon(1e-5)
    assert report.canary_kind == "black-box input" and "loss decrease" in report.score
    assert report.band is None and report.tests == ()
    assert report.included == int(canaries.included.sum())
    text = report.text()
    assert text.split("\n")[2].startswith("  canaries    100 black-box input")
    assert "band        none" in text and "conformance on" not in text
    assert json.loads(report.to_json())["band"] is None
    engine.detach()
    with pytest.raises(PrivacyStateError, match="got model=None and engine.module=None"):
        canaries.report(engine, delta=1e-5)
    assert canaries.report(engine, delta=1e-5, model=model).lower_bound == report.lower_bound


# -- evaluate_scores (NumPy only) ----------------------------------------------------------------
M = 1000
SETTINGS = AuditSettings(M, 0.25, 1.0, 1.0, 100, 1e-5)


def test_scores_that_reveal_membership_beat_a_small_epsilon():
    included = np.random.default_rng(10).random(M) < 0.5
    exposed = evaluate_scores(included + 0.0, included, SETTINGS, 1.0)
    assert exposed.lower_bound > 1.0 and exposed.verdict == "violation"
    assert exposed.lower_bound == pytest.approx(exposed.ceiling)
    assert "exceeds the accountant's epsilon" in exposed.evidence[0]
    assert exposed.guesses in score_candidates(M) and "Bonferroni" in exposed.guess_rule


def test_scores_independent_of_membership_give_no_evidence():
    rng = np.random.default_rng(11)
    report = evaluate_scores(rng.standard_normal(M), rng.random(M) < 0.5, SETTINGS, 1.0,
                             guesses=(50, 50), score="noise")
    assert report.lower_bound < 1.0 and report.verdict == "consistent"
    assert report.guesses == (50, 50) and report.score == "noise"


@pytest.mark.parametrize("scores,included,match", [
    (np.zeros(M - 1), np.zeros(M, bool), r"scores must have shape \(1000,\)"),
    (np.zeros(M), np.zeros((M, 1), bool), r"included must have shape \(1000,\)"),
    (np.full(M, np.nan), np.zeros(M, bool), "scores must be finite; got number of non-finite"),
])
def test_evaluate_scores_refuses_bad_input(scores, included, match):
    with pytest.raises(ConfigError, match=match):
        evaluate_scores(scores, included, SETTINGS, 1.0)
