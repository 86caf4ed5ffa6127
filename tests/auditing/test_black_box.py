"""The black-box audit of the built-in model end to end: mislabeled records in an ordinary
private loop, scored by their loss decrease.

At the built-in settings (1,000 canaries, 400 steps) the black-box bound of a correct run is far
below the accountant's epsilon, and clipping switched off raises it several times over (measured:
0.03-0.51 correct, 0.74-1.20 clipping off, at epsilon 2, 4 and 8, seeds 0-2). It never exceeds the
accountant's epsilon there, so no test expects a violation, and noise switched off does not move
the bound at all (the model cannot memorise one record even without noise): docs/auditing.md.
"""

from __future__ import annotations

import pytest
import torch

from privgrad import PrivacyEngine
from privgrad.auditing import BuiltinAudit, run_builtin_black_box_audit
from tests.auditing.mutants import MUTANTS

CONFIG = BuiltinAudit(epsilon=4.0, seed=0)


@pytest.fixture(scope="module")
def correct():
    """The correct run, shared by both tests (one thread, as conftest sets for each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_builtin_black_box_audit(PrivacyEngine(), CONFIG)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_black_box_bound_is_valid(correct):
    assert correct.canary_kind == "black-box input" and correct.band is None
    assert correct.settings.num_canaries == 1000 and correct.settings.steps == 400
    assert correct.lower_bound <= correct.accountant_epsilon <= 4.0 * (1 + 1e-9), correct.text()
    assert correct.verdict == "consistent", correct.text()


@pytest.mark.slow
def test_clipping_off_raises_the_black_box_bound(monkeypatch, correct):
    MUTANTS["clipping_off"](monkeypatch)
    broken = run_builtin_black_box_audit(PrivacyEngine(), CONFIG)
    assert broken.lower_bound > correct.lower_bound, (broken.text(), correct.text())
