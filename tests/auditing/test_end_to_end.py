"""Row 14 of PRIVACY_TESTS.md: the one-run audit of privgrad's real training loop.

A correct implementation at epsilon 2, 4 and 8 gives a lower bound at most the accountant's
epsilon and inside the simulated band, and passes every conformance test; each mutant of the real
code paths (noise halved, clipping off, Poisson sampling replaced by shuffling) is a violation,
with the evidence that names it. Same seed for all, so the correct runs are the mutants' controls.
"""

from __future__ import annotations

import pytest

from privgrad import PrivacyEngine
from privgrad.auditing import BuiltinAudit, run_builtin_audit
from tests.auditing.mutants import MUTANTS

SEED = 0


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [2.0, 4.0, 8.0])
def test_correct_implementation_is_consistent(epsilon):
    report = run_builtin_audit(PrivacyEngine(), BuiltinAudit(epsilon=epsilon, seed=SEED))
    assert report.accountant_epsilon <= epsilon * (1 + 1e-9)
    assert report.lower_bound <= report.accountant_epsilon, report.text()
    assert report.band.contains(report.lower_bound), report.text()
    assert report.verdict == "consistent", report.text()


@pytest.mark.slow
@pytest.mark.parametrize("mutant,epsilon,evidence", [
    ("noise_halved", 2.0, "noise_std"),
    ("clipping_off", 8.0, "contribution"),
    ("shuffling", 4.0, "inclusion_spread"),
])
def test_mutants_are_violations(monkeypatch, mutant, epsilon, evidence):
    MUTANTS[mutant](monkeypatch)
    report = run_builtin_audit(PrivacyEngine(), BuiltinAudit(epsilon=epsilon, seed=SEED))
    assert report.verdict == "violation", report.text()
    assert any(e.startswith(evidence) for e in report.evidence), report.evidence
