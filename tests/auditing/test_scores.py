"""audit_scores: the canary-score auditor for any attack, its intervals and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from privgrad.auditing import AuditSettings, audit_scores, evaluate_scores
from privgrad.auditing.fdp import fdp_lower_bound
from privgrad.auditing.intervals import auc, clopper_pearson, tpr_at_fpr
from privgrad.auditing.statistics import one_run_lower_bound
from privgrad.errors import ConfigError

M = 1000


def gaussian_scores(mu, seed=0, m=M):
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    scores = rng.standard_normal(m) + mu * included
    return scores[included], scores[~included]


def test_a_perfect_attack_reaches_the_ceiling_and_no_attack_shows_nothing():
    perfect = audit_scores(np.arange(500) + 1000.0, np.arange(500) * 1.0, delta=1e-5, seed=0)
    assert perfect.epsilon == perfect.ceiling and perfect.epsilon_one_run == perfect.ceiling_one_run
    assert perfect.auc == 1 and all(r.tpr == 1 for r in perfect.tpr_at_fpr)
    blind = audit_scores(*gaussian_scores(0.0), delta=1e-5, seed=0)
    assert blind.epsilon < 0.5 and abs(blind.auc - 0.5) < 0.05


def test_f_dp_bound_is_the_epsilon_and_beats_the_one_run_bound():
    audit = audit_scores(*gaussian_scores(1.0), delta=1e-5, seed=0)
    assert audit.epsilon > audit.epsilon_one_run + 0.3
    kp, kn = audit.guesses
    conf = 1 - 0.05 / 3  # three default guess counts, Bonferroni
    assert audit.epsilon == fdp_lower_bound(M, kp + kn, audit.num_correct, 1e-5, conf)
    kp, kn = audit.guesses_one_run
    assert audit.epsilon_one_run == one_run_lower_bound(M, kp + kn, audit.num_correct_one_run, 1e-5,
                                                        conf)
    assert audit.mu is not None and 0 < audit.mu < 1.0  # a lower bound on the true mu = 1
    assert audit.family == "gaussian" and "Bonferroni" in audit.guess_rule


def test_same_bound_as_the_report_of_evaluate_scores():
    x_in, x_out = gaussian_scores(1.0, seed=3)
    scores, included = np.concatenate([x_in, x_out]), np.arange(M) < x_in.size
    settings = AuditSettings(M, 0.1, 1.0, 1.0, 10, 1e-5)
    report = evaluate_scores(scores, included, settings, 8.0)
    audit = audit_scores(x_in, x_out, delta=1e-5, bootstrap=0)
    assert report.fdp.lower_bound == audit.epsilon and report.lower_bound == audit.epsilon_one_run
    assert report.fdp.band is None


def test_rates_and_intervals():
    x_in, x_out = gaussian_scores(1.0, seed=1)
    audit = audit_scores(x_in, x_out, delta=1e-5, confidence=0.9, seed=7)
    assert [r.fpr for r in audit.tpr_at_fpr] == [0.001, 0.01, 0.1]
    for r in audit.tpr_at_fpr:
        tpr, realised, tp = tpr_at_fpr(x_in, x_out, r.fpr)
        assert (r.tpr, r.realised_fpr) == (tpr, realised) and realised <= r.fpr
        assert r.clopper_pearson == clopper_pearson(tp, x_in.size, 0.9)
        assert r.clopper_pearson[0] <= r.tpr <= r.clopper_pearson[1]
        assert r.bootstrap[0] <= r.bootstrap[1]
    u = stats.mannwhitneyu(x_in, x_out).statistic
    assert audit.auc == pytest.approx(u / (x_in.size * x_out.size)) == auc(x_in, x_out)
    assert audit.auc_bootstrap[0] < audit.auc < audit.auc_bootstrap[1]
    again = audit_scores(x_in, x_out, delta=1e-5, confidence=0.9, seed=7)
    assert again == audit  # the bootstrap is seeded
    json.loads(audit.to_json())
    assert "f-DP" in audit.text() and "Clopper-Pearson" in audit.text()


def test_clopper_pearson_is_exact_at_the_edges():
    lo, hi = clopper_pearson(0, 10, 0.95)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** 0.1)
    lo, hi = clopper_pearson(10, 10, 0.95)
    assert hi == 1 and lo == pytest.approx(0.025 ** 0.1)


def test_epsilon_delta_family_needs_no_delta():
    audit = audit_scores(*gaussian_scores(2.0), delta=0, family="epsilon-delta", bootstrap=0)
    assert audit.epsilon > 0 and audit.mu is None


def test_fixed_guesses_are_used_as_given():
    audit = audit_scores(*gaussian_scores(1.0), delta=1e-5, guesses=(40, 60), bootstrap=0)
    assert audit.guesses == audit.guesses_one_run == (40, 60)
    assert audit.guess_rule == "fixed in advance"


@pytest.mark.parametrize("kwargs,match", [
    ({"in_scores": np.ones(900), "out_scores": np.zeros(100)},
     (r"in_scores and out_scores must come from canaries each included with probability 1/2 .*; "
      r"got \(len\(in_scores\), len\(out_scores\)\)=\(900, 100\)\. Include each canary by a fair coin")),
    ({"in_scores": [1.0, float("nan"), 2.0]},
     r"in_scores must be finite; got in_scores\[1\]=nan\. 1 score\(s\) are NaN or infinite; map them"),
    ({"out_scores": []}, r"out_scores must be a non-empty 1-D array; got out_scores.shape=\(0,\)"),
    ({"confidence": 1.5}, r"confidence must be in \(0, 1\); got confidence=1.5\. Pass e\.g\. 0\.95"),
    ({"confidence": 0.0}, r"confidence must be in \(0, 1\); got confidence=0.0"),
    ({"guesses": (5, 4)}, r"each guess pair must make between 1 and 8 guesses .*; got guesses=\(5, 4\)"),
    ({"delta": 0}, (r"delta must be > 0 for family='gaussian' .*; got delta=0\. Pass the delta of "
                    r"the claim, e\.g\. 1e-5, or family='epsilon-delta'")),
])
def test_bad_input_names_the_value_and_the_fix(kwargs, match):
    args = {"in_scores": np.arange(4.0), "out_scores": np.arange(4.0), "delta": 1e-5} | kwargs
    with pytest.raises(ConfigError, match=match):
        audit_scores(**args)


def test_the_score_auditor_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import privgrad.auditing.fdp, privgrad.auditing.intervals, privgrad.auditing.conformance\n"
        "from privgrad.auditing import audit_scores\n"
        "audit_scores(np.arange(50.0) + 10, np.arange(50.0), delta=1e-5, bootstrap=20)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
