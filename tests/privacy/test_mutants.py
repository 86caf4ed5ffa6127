"""The mutants of PRIVACY_TESTS.md: each deliberately broken variant of the library, applied with
``monkeypatch`` to the real code path, must make a conformance check fail.

A mutant that no check catches would mean the suite cannot see that bug; this file is the proof
that it can.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

import privgrad.privacy_engine as engine_module
from privgrad.engine.batch import BackwardBatch
from privgrad.privacy_engine import PrivacyEngine
from privgrad.privatize import clipping, step
from privgrad.privatize.noise import TorchGaussian
from privgrad.privatize.step import ClippedSum
from privgrad.sampling.poisson import PoissonSampler
from tests.engine.test_capture import test_tied_weights_get_one_per_sample_gradient
from tests.privacy import checks

CASES = {c.name: c for c in checks.CASES}


def scaled_noise(factor):
    def apply(mp):
        original = TorchGaussian.sample
        mp.setattr(TorchGaussian, "sample", lambda self, like, std: original(self, like, std * factor))
    return apply


def noise_on_the_mean(mp):
    def noisy(params, sums, *, noise_std, normaliser, noise):
        out = {}
        for p in params:
            s = sums.get(p, torch.zeros_like(p))
            out[p] = (s / normaliser + noise.sample(s, noise_std)).to(p.dtype)
        return out
    mp.setattr(engine_module, "noisy_gradients", noisy)


def realised_batch_size(mp):
    mp.setattr(PrivacyEngine, "normaliser",
               lambda self: float(max(1, self._clipped.stats.examples)) if self.settings.loss_reduction == "mean" else 1.0)


def clipping_disabled(mp):
    mp.setattr(clipping, "_factor", lambda norm, bound: torch.isfinite(norm).to(norm.dtype))


def ghost_ignores_the_bound(mp):
    original = BackwardBatch.weighted_sums

    def weighted_sums(self, weights, keep=None):
        out = original(self, weights, keep)
        ones = torch.ones(self.batch_size, dtype=torch.float64)
        for c, names in self._ghost:
            for n, s in c.rule.weighted_sum(c.module, c, names, ones * self.scale).items():
                out[getattr(c.module, n)] = s
        return out
    mp.setattr(BackwardBatch, "weighted_sums", weighted_sums)


def shuffled_fixed_size(mp):
    rng = np.random.default_rng(0)
    mp.setattr(PoissonSampler, "sample", lambda self: np.sort(
        rng.choice(self.num_records, round(self.sample_rate * self.num_records), replace=False)))


def rate_from_private_size(mp):
    original = engine_module._sampling_rate

    def rate(data_loader, n, sample_rate, expected, reduction, poisson):
        q, e = original(data_loader, n, sample_rate, expected, reduction, poisson)
        return (e / n if sample_rate is not None else q), e
    mp.setattr(engine_module, "_sampling_rate", rate)


def tied_counted_twice(mp):
    original = BackwardBatch.__init__

    def init(self, captures, **kwargs):
        original(self, captures, **kwargs)
        uses = defaultdict(list)
        for c in captures:
            for n in c.names:
                uses[getattr(c.module, n)].append((c, n))
        for p, found in uses.items():
            if len(found) > 1:  # each use treated as its own sample: no cross term
                self.norms_sq[p] = sum(
                    (c.rule.per_sample_gradients(c.module, c, (n,))[n] * self.scale).flatten(1).square().sum(1)
                    for c, n in found)
    mp.setattr(BackwardBatch, "__init__", init)


def noise_skips_a_group(mp):
    mp.setattr(engine_module, "_privatised",
               lambda opt: [p for p in opt.param_groups[0]["params"] if p.requires_grad])


def zero_grad_forgotten(mp):
    mp.setattr(ClippedSum, "reset", lambda self: setattr(self, "stats", step.StepStats()))


def calibration_overshoots(mp):
    original = engine_module.get_noise_multiplier
    mp.setattr(engine_module, "get_noise_multiplier", lambda **kw: 0.9 * original(**kw))


MUTANTS = {
    "noise x0.5": (scaled_noise(0.5), lambda: checks.check_noise_distribution("mean", steps=60)),
    "noise x2": (scaled_noise(2.0), lambda: checks.check_noise_distribution("mean", steps=60)),
    "noise added to the mean": (noise_on_the_mean, lambda: checks.check_noise_distribution("mean", steps=60)),
    "divided by the realised batch size": (realised_batch_size, lambda: checks.check_noise_distribution("mean", steps=200)),
    "clipping disabled": (clipping_disabled, lambda: checks.check_clipping_bound(CASES["mlp"], "auto")),
    "fast path ignores max_grad_norm": (ghost_ignores_the_bound, lambda: checks.check_clipping_bound(CASES["mlp"], "ghost")),
    "shuffled fixed-size batches": (shuffled_fixed_size, lambda: checks.check_engine_loader_is_poisson(steps=500)),
    "q from the private size": (rate_from_private_size, checks.check_size_independent),
    "tied weights counted as two samples": (tied_counted_twice, test_tied_weights_get_one_per_sample_gradient),
    "noise skipped on one parameter group": (noise_skips_a_group, lambda: checks.check_noise_on_every_parameter("auto", steps=40)),
    "zero_grad forgotten between steps": (zero_grad_forgotten, lambda: checks.check_add_one_sensitivity(CASES["mlp"], "auto")),
    "calibration overshoots the target": (calibration_overshoots, checks.check_epsilon_target),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(name, monkeypatch):
    mutate, check = MUTANTS[name]
    mutate(monkeypatch)
    with pytest.raises(AssertionError):
        check()
