"""The mutants of PRIVACY_TESTS.md's "user's loop" rows (15-20): each guard switched off must make
the test of its row fail. (The mechanism's mutants are in test_mutants.py.)"""

from __future__ import annotations

import math

import pytest
from _pytest.outcomes import Failed

import privgrad.privacy_engine as engine_module
import privgrad.training_hooks as hooks_module
from privgrad.errors import PrivacyStateError
from privgrad.engine.guard import StateGuard
from privgrad.engine import clipped_sum as step
from privgrad.privatize.clipping import per_layer_bounds
from privgrad.privatize.noise import TorchGaussian
from tests.engine import test_guard
from tests.privacy import test_holes


def guard_off(mp):
    mp.setattr(StateGuard, "_refuse_writer", lambda self, module, args: None)
    mp.setattr(StateGuard, "_compare", lambda self, before, now, during: None)
    mp.setattr(StateGuard, "watch_values", property(lambda self: False, lambda self, v: None),
               raising=False)


def bounds_recomputed(mp):
    """The old patch: a parameter without a bound gets a fresh one, C / sqrt(#new)."""
    mp.setattr(engine_module.PrivacyEngine, "_refuse_unbounded", lambda self, params: None)
    original = step.ClippedSum.add

    def add(self, batch, params):
        if isinstance(self.bounds, dict):
            missing = [p for p in batch.norms_sq if p in params and p not in self.bounds]
            total = math.sqrt(sum(c * c for c in self.bounds.values()))  # C
            self.bounds.update(per_layer_bounds(missing, total))
        return original(self, batch, params)
    mp.setattr(step.ClippedSum, "add", add)


def noise_not_restored(mp):
    mp.setattr(TorchGaussian, "load_state_dict", lambda self, state: None)


def logical_batch_not_reset(mp):
    mp.setattr(engine_module.PrivacyEngine, "_abandon",
               lambda self: setattr(self, "_release_now", True))


def self_check_removed(mp):
    mp.setattr(hooks_module, "check_sums", lambda *args, **kwargs: True)


def rows_not_checked(mp):
    mp.setattr(engine_module.DrawnRows, "add", lambda self, tags, rows: None)
    mp.setattr(engine_module.DrawnRows, "release", lambda self: None)


MUTANTS = {
    "15: state guard off (forward write)": (
        guard_off, test_holes.test_embedding_max_norm_set_after_make_private_is_refused_before_the_write),
    "15: state guard off (custom buffer)": (
        guard_off, lambda: test_guard.test_a_custom_running_average_is_refused_naming_module_and_tensor(
            False, "submodule")),
    "16: per-layer bounds recomputed": (
        bounds_recomputed, lambda: test_holes.test_per_layer_bound_is_fixed_when_the_guarantee_is_set(
            "requires_grad_")),
    "17: noise generator not restored": (
        noise_not_restored, lambda: _tmp(lambda d: test_holes.
            test_a_resumed_run_in_a_process_seeded_like_the_first_never_replays(d, False))),
    "18: logical-batch reset removed": (
        logical_batch_not_reset,
        test_holes.test_breaking_out_of_virtual_batches_carries_nothing_into_the_next_release),
    "19: first-step self-check removed": (
        self_check_removed, lambda: test_holes.
        test_per_sample_gradients_that_do_not_add_up_are_refused_naming_the_parameter(
            "tied head via F.linear")),
    "20: rows not checked against the drawn batch": (
        rows_not_checked, test_holes.test_sequence_first_rows_are_refused_before_any_release),
}


def _tmp(run):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        run(Path(d))


@pytest.mark.parametrize("name", list(MUTANTS))
def test_loop_mutant_is_caught(name, monkeypatch):
    """The row's test fails: an assertion, a refusal it expected that did not come, or an error
    from another guard (the logical-batch reset is backed by the rows check, for one)."""
    mutate, check = MUTANTS[name]
    mutate(monkeypatch)
    with pytest.raises((AssertionError, Failed, PrivacyStateError)):
        check()
