"""The mutants of PRIVACY_TESTS.md: each deliberately broken variant of the library, applied with
``monkeypatch`` to the real code path, must make a conformance check fail.

A mutant that no check catches would mean the suite cannot see that bug; this file is the proof
that it can.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import privgrad.accounting as accounting
import privgrad.engine.clipped_sum as clipped_sum_module
import privgrad.privatize.adaptive as adaptive_module
import privgrad.releases as releases_module
import privgrad.training_hooks as hooks_module
import privgrad.run_state as run_state_module
import privgrad.sampling.plan as plan_module
import privgrad.settings as settings_module
from privgrad.engine.batch import BackwardBatch
from privgrad.privacy_engine import PrivacyEngine
from privgrad.privatize import clipping
from privgrad.privatize.noise import TorchGaussian
from privgrad.engine.clipped_sum import ClippedSum, StepStats
from privgrad.engine.amp import ScalerLink
from privgrad.privatize import secure
from privgrad.sampling.poisson import PoissonSampler, numpy_bits
from tests.engine.test_capture import test_tied_weights_get_one_per_sample_gradient
from tests.privacy import checks, secure_checks
from privgrad.accounting.events import Composed
from tests.privatize import test_adaptive_clipping as adaptive_tests
from tests.privatize import test_statistics as statistics_tests
from tests.reliability import checks as reliability

CASES = {c.name: c for c in checks.CASES}


def scaled_noise(factor):
    def apply(mp):
        original = TorchGaussian.fill
        mp.setattr(TorchGaussian, "fill", lambda self, out, std: original(self, out, std * factor))
    return apply


def noise_on_the_mean(mp):
    def noisy(params, sums, *, noise_std, normaliser, noise):
        out = {}
        for p in params:
            s = sums.get(p, torch.zeros_like(p))
            out[p] = (s / normaliser + noise.sample(s, noise_std)).to(p.dtype)
        return out
    mp.setattr(hooks_module, "noisy_gradients", noisy)


def realised_batch_size(mp):
    mp.setattr(PrivacyEngine, "normaliser",
               lambda self: float(max(1, self._clipped.stats.examples)) if self.settings.loss_reduction == "mean" else 1.0)


def clipping_disabled(mp):
    mp.setattr(clipping, "_factor", lambda norm, bound, **_: torch.isfinite(norm).to(norm.dtype))


def ghost_ignores_the_bound(mp):
    original = BackwardBatch.weighted_sums

    def weighted_sums(self, weights, keep=None, *, sparse=False):
        out = original(self, weights, keep, sparse=sparse)
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
    original = plan_module.sampling_rate

    def rate(data_loader, n, sample_rate, expected, reduction, poisson):
        q, e = original(data_loader, n, sample_rate, expected, reduction, poisson)
        return (e / n if sample_rate is not None else q), e
    mp.setattr(plan_module, "sampling_rate", rate)


def tied_counted_twice(mp):
    original = BackwardBatch.__init__

    def init(self, captures, **kwargs):
        original(self, captures, **kwargs)
        uses = defaultdict(list)
        for c in captures:
            for n in c.names:
                uses[getattr(c.module, n)].append((c, n))
        def use(c, n):  # a use's own per-sample gradient (formed during backward, or now)
            return c.early[n] if c.early is not None else c.rule.per_sample_gradients(c.module, c, (n,))[n]

        for p, found in uses.items():
            if len(found) > 1:  # each use treated as its own sample: no cross term
                self.norms_sq[p] = sum(
                    (use(c, n) * self.scale).flatten(1).square().sum(1) for c, n in found)
    mp.setattr(BackwardBatch, "__init__", init)


def noise_skips_a_group(mp):
    mp.setattr(settings_module, "privatised",
               lambda opt: [p for p in opt.param_groups[0]["params"] if p.requires_grad])


def zero_grad_forgotten(mp):
    mp.setattr(ClippedSum, "reset", lambda self: setattr(self, "stats", StepStats()))


def calibration_overshoots(mp):
    original = accounting.get_noise_multiplier
    mp.setattr(accounting, "get_noise_multiplier", lambda **kw: 0.9 * original(**kw))


def rate_from_len_data_loader(mp):
    original = plan_module.sampling_rate

    def rate(data_loader, n, sample_rate, expected, reduction, poisson):
        _, e = original(data_loader, n, sample_rate, expected, reduction, poisson)
        return 1.0 / len(data_loader), e
    mp.setattr(plan_module, "sampling_rate", rate)


def non_finite_kept(mp):
    mp.setattr(clipping, "_factor", lambda norm, bound, **_: (bound / norm).clamp(max=1.0))


# -- secure mode (row 13) ----------------------------------------------------------------------
def secure_noise_scaled(factor):
    def apply(mp):
        original = secure.lattice_offsets
        mp.setattr(secure, "lattice_offsets", lambda f, k, hi, lo: original(f, k * factor, hi, lo))
    return apply


def secure_noise_in_floating_point(mp):
    mp.setattr(secure.SecureGaussian, "add_noise",
               lambda self, total, std: total.double() + torch.randn_like(total.double()) * std)


def secure_generator_seeded(mp):
    mp.setattr(secure.SecureRandom, "words", lambda self, n, pin=False: torch.randint(
        -2**63, 2**63 - 1, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(0)))


def secure_sampling_seeded(mp):
    mp.setattr(plan_module, "os_bits", numpy_bits(0))


# -- mixed precision and checkpoints (tests/reliability) -------------------------------------------
def loss_scale_left_in(mp):
    mp.setattr(ScalerLink, "loss_scale", lambda self: 1.0)


def skipped_step_kept(mp):
    mp.setattr(ScalerLink, "discard", lambda self, clipped: None)


def sampler_not_restored(mp):
    mp.setattr(run_state_module, "numpy_bits", lambda seed: numpy_bits(seed + 1))


def rng_not_restored(mp):
    mp.setattr(torch, "set_rng_state", lambda state: None)


def noise_not_restored(mp):
    mp.setattr(TorchGaussian, "load_state_dict", lambda self, state: None)


def resume_check(sigma: float):
    def check():
        with tempfile.TemporaryDirectory() as tmp:
            reliability.check_resume_is_exact(Path(tmp) / "run.pt", sigma=sigma)
    return check


def automatic_ignores_the_bound(mp):
    original = clipped_sum_module.automatic_clip
    mp.setattr(clipped_sum_module, "automatic_clip",
               lambda norms_sq, bound, gamma, *a: original(norms_sq, 1.0, gamma, *a))


def adaptive_noise_not_raised(mp):
    mp.setattr(settings_module.PrivacySettings, "gradient_noise_multiplier",
               property(lambda self: self.noise_multiplier))


def adaptive_count_not_centred(mp):
    """The count released as sum_b 1[within] + noise: sensitivity 1, noise sized for 1/2."""
    mp.setattr(adaptive_module.QuantileBound, "release", lambda self, within, examples, noise:
               noise.add_noise(torch.as_tensor(within, dtype=torch.float64).reshape(1),
                               self.count_noise_std))


def release_ignores_the_bound(mp):
    mp.setattr(releases_module, "noisy_sum", lambda rows, *, max_norm, noise_multiplier, noise:
               noise.add_noise(rows.sum(0), noise_multiplier * max_norm))


def release_not_recorded(mp):
    mp.setattr(releases_module, "PoissonGaussian", lambda sigma, q: Composed(()))


def release_unit_unchecked(mp):
    mp.setattr(releases_module.Releases, "_refuse_other_unit", lambda self, unit: None)


def calibration_ignores_the_spent(mp):
    original = accounting.get_noise_multiplier
    mp.setattr(accounting, "get_noise_multiplier", lambda **kw: original(**{**kw, "prior": None}))


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
    "q from len(data_loader)": (rate_from_len_data_loader, checks.check_size_independent),
    "a release ignores max_norm": (release_ignores_the_bound, statistics_tests.test_one_example_moves_the_sum_by_at_most_the_bound),
    "a release not in the accountant": (release_not_recorded, statistics_tests.test_the_release_is_recorded_as_the_gaussian_mechanism),
    "an example-level release under a user-level run": (release_unit_unchecked, lambda: statistics_tests.test_a_run_must_protect_the_unit_its_releases_protected("example", "user")),
    "calibration ignores what was spent": (calibration_ignores_the_spent, lambda: statistics_tests.test_training_after_a_release_ends_at_the_target_not_above(None)),
    "non-finite example kept": (non_finite_kept, lambda: checks.check_non_finite_record(CASES["mlp"], "auto")),
    "secure noise x0.5": (secure_noise_scaled(0.5), lambda: secure_checks.check_secure_noise_distribution(steps=60)),
    "secure noise x2": (secure_noise_scaled(2.0), lambda: secure_checks.check_secure_noise_distribution(steps=60)),
    "secure noise added in floating point": (secure_noise_in_floating_point, lambda: secure_checks.check_secure_noise_distribution(steps=60)),
    "secure generator seeded": (secure_generator_seeded, lambda: secure_checks.check_secure_runs_differ(steps=6)),
    "secure sampling seeded": (secure_sampling_seeded, lambda: secure_checks.check_secure_runs_differ(steps=6)),
    "GradScaler loss scale left in": (loss_scale_left_in, lambda: reliability.check_amp_matches_float32(torch.float16, 2.0**16)),
    "skipped step's clipped sums kept": (skipped_step_kept, reliability.check_skipped_step_is_discarded),
    "sampler seed not restored": (sampler_not_restored, resume_check(0.0)),
    "RNG state not restored": (rng_not_restored, resume_check(1.0)),
    "noise generators not restored": (noise_not_restored, resume_check(1.0)),
    "automatic clipping ignores max_grad_norm": (automatic_ignores_the_bound, lambda: checks.check_clipping_bound(CASES["mlp"], "ghost", clipping="automatic")),
    "adaptive clipping's gradient noise not raised": (adaptive_noise_not_raised, adaptive_tests.test_the_gradient_noise_is_raised_to_keep_the_pair_at_z),
    "adaptive clipping's count not centred": (adaptive_count_not_centred, lambda: adaptive_tests.test_one_example_moves_each_release_by_its_sensitivity(1e-8)),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(name, monkeypatch):
    mutate, check = MUTANTS[name]
    mutate(monkeypatch)
    with pytest.raises(AssertionError):
        check()
