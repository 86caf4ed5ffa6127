"""The trade-off curve and the privacy report, against closed forms and an independent PLD.

References: the Gaussian mechanism without sampling is exactly ``mu = 1/sigma`` Gaussian-DP, with
``f(alpha) = Phi(Phi^-1(1 - alpha) - mu)`` and the (epsilon, delta) of Balle and Wang, which
``dp_accounting.get_epsilon_gaussian`` implements independently; for subsampled runs,
``dp_accounting``'s own PLD built at a finer grid, pessimistic and optimistic.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from privgrad.accounting import make_accountant
from privgrad.accounting.report import gaussian_dp_mu, privacy_report
from privgrad.accounting.tradeoff import (
    TradeOffCurve,
    gdp_delta,
    gdp_epsilon,
    gdp_mu,
    gdp_tradeoff,
    tradeoff_curve,
)
from privgrad.errors import ConfigError

FPRS = np.concatenate([np.logspace(-6, -1, 30), np.linspace(0.1, 1, 37)])


def accountant(sigma, q, steps, kind="pld"):
    acc = make_accountant(kind)
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return acc


def closed_form_tpr(mu, fpr):
    return stats.norm.cdf(stats.norm.ppf(fpr) + mu)  # 1 - Phi(Phi^-1(1 - a) - mu)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_gdp_epsilon_matches_dp_accounting(sigma, delta):
    import dp_accounting

    ours = gdp_epsilon(1 / sigma, delta)
    assert ours == pytest.approx(dp_accounting.get_epsilon_gaussian(sigma, delta), rel=1e-6, abs=1e-9)
    assert gdp_delta(1 / sigma, ours) == pytest.approx(delta, rel=1e-6)
    assert gdp_mu(ours, delta) == pytest.approx(1 / sigma, rel=1e-6)


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 4), (0.7, 3)])
def test_gaussian_without_sampling_is_exactly_gdp(sigma, steps):
    mu = math.sqrt(steps) / sigma
    curve = tradeoff_curve(accountant(sigma, 1.0, steps))
    np.testing.assert_allclose(curve.tpr(FPRS), closed_form_tpr(mu, FPRS), atol=1e-4)
    assert curve.advantage == pytest.approx(2 * stats.norm.cdf(mu / 2) - 1, rel=1e-9)
    report = privacy_report(accountant(sigma, 1.0, steps), delta=1e-5)
    assert report.mu == pytest.approx(mu) and report.mu_exact
    assert report.mu_gap < 1e-4


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_the_conjugate_of_dp_accountings_gaussian_pld_is_the_closed_form(sigma):
    """The curve built from a profile (both directions, all epsilons) is the Gaussian one:
    checks the conjugate itself on dp_accounting's PLD, not the closed-form shortcut."""
    from dp_accounting.pld import privacy_loss_distribution as dp_pld

    pld = dp_pld.from_gaussian_mechanism(sigma, value_discretization_interval=1e-4)
    eps = np.linspace(0, pld.get_epsilon_for_delta(1e-14), 4000)
    curve = TradeOffCurve(eps, np.asarray(pld.get_delta_for_epsilon(eps)))
    np.testing.assert_allclose(curve.tpr(FPRS), closed_form_tpr(1 / sigma, FPRS), atol=2e-3)
    # symmetric: f(f(alpha)) = alpha
    np.testing.assert_allclose(curve.fnr(curve.fnr(FPRS)), FPRS, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.01, 1000), (5.5, 0.25, 400), (0.8, 0.05, 10)])
def test_subsampled_curve_is_bracketed_by_dp_accountings_pld(sigma, q, steps):
    """Our (pessimistic) TPR is at least the optimistic PLD's, and at most the pessimistic PLD's
    plus the grid error; the profile read back from the curve is dp_accounting's delta."""
    from dp_accounting.pld import privacy_loss_distribution as dp_pld

    curve = tradeoff_curve(accountant(sigma, q, steps))

    def reference(pessimistic):
        one = dp_pld.from_gaussian_mechanism(sigma, sampling_prob=q, pessimistic_estimate=pessimistic,
                                             value_discretization_interval=2e-4)
        pld = one.self_compose(steps)
        eps = np.linspace(0, pld.get_epsilon_for_delta(1e-13), 4000)
        return pld, TradeOffCurve(eps, np.asarray(pld.get_delta_for_epsilon(eps)))

    pess, upper = reference(True)
    _, lower = reference(False)
    ours = curve.tpr(FPRS)
    assert np.all(ours >= lower.tpr(FPRS) - 1e-4)
    assert np.all(ours <= upper.tpr(FPRS) + 3e-3)
    alphas = np.linspace(0, 1, 20001)
    for eps in (0.0, 0.5, 1.0, 2.0):
        back = np.max(curve.tpr(alphas) - math.exp(eps) * alphas)
        assert back == pytest.approx(float(pess.get_delta_for_epsilon(eps)), abs=2e-3)
    assert curve.advantage == pytest.approx(float(pess.get_delta_for_epsilon(0.0)), abs=2e-3)


def test_report_epsilons_are_the_accountants(monkeypatch):
    for kind in ("pld", "rdp"):
        acc = accountant(1.1, 0.01, 500, kind)
        report = privacy_report(acc, delta=1e-5, deltas=(1e-3, 1e-7))
        assert report.accountant == kind and report.steps == 500
        assert report.epsilon == acc.get_epsilon(1e-5)
        assert [d for d, _ in report.epsilons] == [1e-3, 1e-5, 1e-7]
        assert all(e == acc.get_epsilon(d) for d, e in report.epsilons)
    # the default table: 10 delta, delta, delta / 10, delta / 100, without float noise
    assert [d for d, _ in privacy_report(acc, delta=1e-5).epsilons] == [1e-4, 1e-5, 1e-6, 1e-7]


def test_report_reads_like_the_curve():
    acc = accountant(5.5, 0.25, 400)
    report = privacy_report(acc, delta=1e-5)
    curve = tradeoff_curve(acc)
    assert [f for f, _ in report.tpr_at_fpr] == [0.001, 0.01, 0.1]
    for f, t in report.tpr_at_fpr:
        assert t == pytest.approx(curve.tpr(f)) and f < t < 1
    fpr, fnr = map(np.array, zip(*report.curve))
    assert fpr[0] == 0 and fpr[-1] == 1 and np.all(np.diff(fpr) > 0)
    assert np.all(np.diff(fnr) <= 1e-12) and np.all(fnr <= 1 - fpr + 1e-12)
    mu, exact = gaussian_dp_mu(acc.history)
    assert not exact and report.mu == mu == pytest.approx(0.25 * math.sqrt(400 * math.expm1(1 / 5.5**2)))
    assert report.mu_gap < 0.01  # 400 steps: the central limit is close
    assert 0 < report.advantage < 1
    text = report.text()
    assert "central-limit approximation" in text and "advantage" in text
    points = json.loads(report.to_json())["tradeoff"]
    assert points[0] == {"fpr": 0.0, "tpr": pytest.approx(1 - fnr[0])}
    assert all(set(p) == {"fpr", "tpr"} for p in points)


def test_few_subsampled_steps_are_far_from_gaussian_and_the_report_says_so():
    report = privacy_report(accountant(0.6, 0.1, 3), delta=1e-5)
    assert not report.mu_exact and report.mu_gap > 0.1  # measured 0.135


def test_no_steps_is_perfect_privacy_and_no_noise_is_none():
    empty = privacy_report(make_accountant("pld"), delta=1e-5)
    assert empty.epsilon == 0 and empty.advantage == 0 and empty.mu == 0
    assert all(t == pytest.approx(f) for f, t in empty.tpr_at_fpr)
    bare = privacy_report(accountant(0.0, 0.1, 10), delta=1e-5)
    assert math.isinf(bare.epsilon) and bare.advantage == 1 and math.isinf(bare.mu)
    assert all(t == 1 for _, t in bare.tpr_at_fpr)
    plain = bare.to_dict()
    assert plain["epsilon"] is None and plain["gaussian_dp_mu"] is None
    json.dumps(plain, allow_nan=False)


@pytest.mark.parametrize("sigma", [1e-9, 0.05])
def test_huge_leakage_gives_a_finite_pessimistic_report(sigma):
    """exp(epsilon) overflows in dp_accounting (NaN deltas) or the PLD cannot be built at all."""
    acc = accountant(sigma, 0.01, 1000)
    acc.step(noise_multiplier=2.0, sample_rate=0.02, num_steps=10)
    report = privacy_report(acc, delta=1e-5)
    assert report.advantage > 0.99 and all(t == 1.0 for _, t in report.tpr_at_fpr)
    assert not np.isnan(np.array(report.curve)).any()
    json.dumps(report.to_dict(), allow_nan=False)


@pytest.mark.parametrize("delta", [0, 1.0, -1e-5, float("nan")])
def test_bad_delta_names_the_value_and_the_fix(delta):
    with pytest.raises(ConfigError, match=r"delta must be in \(0, 1\); got delta="):
        privacy_report(accountant(1.0, 0.1, 10), delta=delta)


def test_bad_fpr_and_mu_are_refused():
    curve = tradeoff_curve(accountant(1.0, 0.1, 10))
    with pytest.raises(ConfigError, match=r"fpr must be in \[0, 1\]; got fpr=1.5. Pass"):
        curve.tpr(1.5)
    with pytest.raises(ConfigError, match="mu must be finite and >= 0; got mu=-1"):
        gdp_tradeoff(-1, 0.1)


def test_the_report_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from privgrad.accounting import make_accountant\n"
        "from privgrad.accounting.report import privacy_report\n"
        "a = make_accountant(); a.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=10)\n"
        "privacy_report(a, delta=1e-5).to_json()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_closed_form_check_catches_a_one_sided_curve():
    """Mutant: the curve from one branch of the conjugate only (no symmetric part, as if only the
    remove direction's epsilons >= 0 counted). The Gaussian check above must see it."""
    from dp_accounting.pld import privacy_loss_distribution as dp_pld

    pld = dp_pld.from_gaussian_mechanism(1.0, value_discretization_interval=1e-4)
    eps = np.linspace(0, pld.get_epsilon_for_delta(1e-14), 4000)
    d = np.asarray(pld.get_delta_for_epsilon(eps))
    one_sided = np.array([max(0.0, np.max(1 - d - np.exp(eps) * a)) for a in FPRS])
    assert np.max(np.abs((1 - one_sided) - closed_form_tpr(1.0, FPRS))) > 2e-3
