"""Audit any attack's canary scores with privgrad's one-run statistics (NumPy only, no torch).

``audit_scores(in_scores, out_scores, delta=...)`` is for scores from anywhere: another attack,
another library, another framework. It puts side by side the f-DP lower bound of Mahloujifar,
Melis and Chaudhuri (2024, ``fdp``; its ``.epsilon``), the one-run bound of Steinke, Nasr and
Jagielski (2023, ``statistics``) on the same scores, the attack's TPR at FPR 0.1%, 1% and 10%
with Clopper-Pearson and bootstrap intervals, its AUC, and the classic Clopper-Pearson epsilon
estimate (``intervals``).

``evaluate_scores()`` makes an ``AuditReport`` (with a verdict against an accountant's epsilon)
from per-canary scores of a privgrad run, such as the losses of black-box input canaries
(``privgrad.auditing.input_canaries``). Nothing models such scores, so that report has no band
and no conformance tests: only a bound above the accountant's epsilon is evidence of a violation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from privgrad import _validate
from privgrad.auditing.fdp import (
    check_delta_for,
    check_family,
    fdp_lower_bound,
    fdp_mu_lower_bound,
)
from privgrad.auditing.intervals import (
    auc,
    bootstrap_interval,
    clopper_pearson,
    epsilon_clopper_pearson,
    tpr_at_fpr,
)
from privgrad.auditing.report import AuditReport, _fdp, _lower_bound, _rule, _verdict
from privgrad.auditing.simulation import AuditSettings, GuessRule
from privgrad.auditing.statistics import (
    _check_confidence,
    count_correct,
    make_guesses,
    one_run_lower_bound,
)

__all__ = ["RateAt", "ScoreAudit", "audit_scores", "evaluate_scores", "score_candidates"]

_SCORE_FRACTIONS = (0.025, 0.05, 0.1)  # default guesses, per side
#: FPRs at which ``audit_scores`` states the attack's TPR.
FPRS = (0.001, 0.01, 0.1)
#: A split of in and out canaries less likely than this under fair coins is refused.
BALANCE_ALPHA = 1e-6


def score_candidates(num_canaries: int) -> tuple[tuple[int, int], ...]:
    """The default guesses of ``evaluate_scores()``: ``k`` in + ``k`` out for ``k`` of 2.5%,
    5% and 10% of the canaries, the best taken with a Bonferroni correction."""
    ks = sorted({max(1, round(f * num_canaries)) for f in _SCORE_FRACTIONS})
    return tuple((k, k) for k in ks if 2 * k <= num_canaries) or ((1, 0),)


def evaluate_scores(scores: np.ndarray, included: np.ndarray, settings: AuditSettings,
                    accountant_epsilon: float, *,
                    guesses: tuple[int, int] | list[tuple[int, int]] | None = None,
                    canary_kind: str = "black-box input",
                    score: str = "a score of your own") -> AuditReport:
    """Audit one run from per-canary scores (higher: more likely included), e.g. losses.

    The lower bound is the one of ``evaluate()``; there is no band and there are no
    conformance tests, because no simulation describes what a correct run does to such scores.
    The verdict is ``"violation"`` only when the bound exceeds ``accountant_epsilon``.

    Args:
        scores: ``(m,)`` one finite score per canary.
        included: ``(m,)`` bool, whether each canary was in the training set.
        settings: the run's public settings (``settings.num_canaries`` must be ``m``).
        accountant_epsilon: the accountant's epsilon at ``settings.delta``.
        guesses: ``(num_positive, num_negative)`` fixed in advance, or a list of such pairs for
            the Bonferroni-corrected best of them; ``None`` (default) for
            ``score_candidates()``.
        canary_kind: which canaries were scored, for the report.
        score: how they were scored, in words, for the report.

    Returns:
        An [`AuditReport`][privgrad.auditing.report.AuditReport] with ``band=None`` and no tests.

    Privacy:
        The bound is valid whenever the scores are a function of what the run released and of
        randomness independent of the inclusion bits (never of the bits themselves). A
        "consistent" verdict here is weak evidence: black-box scores usually leak far less than
        the mechanism allows, so their bound sits far below the accountant's epsilon even for
        some broken implementations.
    """
    m = settings.num_canaries
    x, bits = np.asarray(scores, dtype=np.float64), np.asarray(included)
    for name, value in (("scores", x), ("included", bits)):
        if value.shape != (m,):
            raise _validate.fail(f"{name} must have shape ({m},), one value per canary",
                                 f"{name}.shape", value.shape,
                                 "Pass one value per canary, or settings with that many canaries.")
    if not np.all(np.isfinite(x)):
        raise _validate.fail("scores must be finite", "number of non-finite scores",
                             int(np.count_nonzero(~np.isfinite(x))),
                             "Map a non-finite loss to a finite score before auditing.")
    eps = _validate.positive("accountant_epsilon", accountant_epsilon,
                             "Pass engine.get_epsilon(delta).", finite=False)
    rule = (GuessRule(score_candidates(m), chosen_by="the default") if guesses is None
            else _rule(guesses, settings, None))
    bound, pair, correct, p_value, top = _lower_bound(x, bits.astype(bool), rule, settings, eps)
    fdp = _fdp(x, bits, rule, settings, eps, None)
    verdict, evidence = _verdict(bound, eps, None, (), 1e-3, settings.confidence, fdp)
    return AuditReport(settings, float(eps), bound, p_value, pair, rule.describe(), correct, top,
                       None, (), 1e-3, int(np.count_nonzero(bits)), verdict, evidence,
                       canary_kind=str(canary_kind), score=str(score), fdp=fdp)


@dataclass(frozen=True)
class RateAt:
    """The attack's TPR at one FPR.

    Attributes:
        fpr: the FPR asked for; the threshold is set on the held-out scores alone so that at
            most this share of them is called "in".
        realised_fpr: the share of held-out scores above that threshold.
        tpr: the share of held-in scores above it.
        clopper_pearson: exact interval for the TPR at the audit's confidence (the threshold
            does not depend on the held-in scores, so the interval is exact).
        bootstrap: percentile-bootstrap interval of the TPR (both score sets resampled).
    """

    fpr: float
    realised_fpr: float
    tpr: float
    clopper_pearson: tuple[float, float]
    bootstrap: tuple[float, float]


@dataclass(frozen=True)
class ScoreAudit:
    """What one attack's canary scores show; ``.epsilon`` is the f-DP lower bound.

    Attributes:
        epsilon: the f-DP lower bound at ``delta`` and ``confidence`` (``fdp``).
        mu: the Gaussian-DP ``mu`` lower bound (``family="gaussian"``), else ``None``.
        epsilon_one_run: the one-run bound of Steinke et al. on the same scores and guesses.
        epsilon_clopper_pearson: the classic estimate (``intervals.epsilon_clopper_pearson``);
            a bound only when canaries are independent runs.
        family, delta, confidence: as passed.
        num_in, num_out: held-in and held-out canaries.
        guesses: ``(num_positive, num_negative)`` of the best f-DP bound; ``num_correct``
            guesses right. ``guesses_one_run`` and ``num_correct_one_run`` likewise.
        guess_rule: how the guesses were fixed, in words.
        ceiling, ceiling_one_run: the bounds if every guess were right.
        tpr_at_fpr: ``RateAt`` at FPR 0.1%, 1% and 10%.
        auc: area under the ROC curve; ``auc_bootstrap`` its bootstrap interval.
    """

    epsilon: float
    mu: float | None
    epsilon_one_run: float
    epsilon_clopper_pearson: float
    family: str
    delta: float
    confidence: float
    num_in: int
    num_out: int
    guesses: tuple[int, int]
    num_correct: int
    guesses_one_run: tuple[int, int]
    num_correct_one_run: int
    guess_rule: str
    ceiling: float
    ceiling_one_run: float
    tpr_at_fpr: tuple[RateAt, ...]
    auc: float
    auc_bootstrap: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def text(self) -> str:
        """A human-readable rendering."""
        c = f"{self.confidence:.0%}"
        mu = "" if self.mu is None else f", mu >= {self.mu:.3f}"
        rates = "\n".join(
            f"  TPR at FPR {r.fpr:<6g} {r.tpr:.3f}  (realised FPR {r.realised_fpr:.4f}; "
            f"Clopper-Pearson {r.clopper_pearson[0]:.3f}-{r.clopper_pearson[1]:.3f}, "
            f"bootstrap {r.bootstrap[0]:.3f}-{r.bootstrap[1]:.3f})" for r in self.tpr_at_fpr)
        return "\n".join([
            f"privgrad canary-score audit: {self.num_in} in, {self.num_out} out, delta={self.delta:g}",
            (f"  f-DP        epsilon >= {self.epsilon:.2f} ({c}, {self.family} curves{mu}; "
             f"{self.guesses[0]} in + {self.guesses[1]} out, {self.num_correct} right; "
             f"ceiling {self.ceiling:.2f})"),
            (f"  one-run     epsilon >= {self.epsilon_one_run:.2f} ({c}, Steinke et al. 2023; "
             f"{self.guesses_one_run[0]} in + {self.guesses_one_run[1]} out, "
             f"{self.num_correct_one_run} right; ceiling {self.ceiling_one_run:.2f})"),
            f"  guesses     {self.guess_rule}",
            (f"  C-P         epsilon ~ {self.epsilon_clopper_pearson:.2f} (assumes independent "
             "canaries: a bound only when each is its own run)"),
            (f"  AUC         {self.auc:.3f} (bootstrap {self.auc_bootstrap[0]:.3f}-"
             f"{self.auc_bootstrap[1]:.3f})"),
            rates,
        ])


def _scores(name: str, values) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise _validate.fail(f"{name} must be numbers", name, type(values).__name__,
                             "Pass a 1-D array of scores.") from e
    if x.ndim != 1 or x.size == 0:
        raise _validate.fail(f"{name} must be a non-empty 1-D array", f"{name}.shape", x.shape,
                             "Pass one score per canary.")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise _validate.fail(
            f"{name} must be finite", f"{name}[{int(bad[0])}]", float(x[bad[0]]),
            f"{bad.size} score(s) are NaN or infinite; map them to finite scores before auditing "
            f"(e.g. a NaN loss to the largest finite loss).")
    return x


def _check_balance(n_in: int, n_out: int) -> None:
    p = float(stats.binomtest(n_in, n_in + n_out, 0.5).pvalue)
    if p < BALANCE_ALPHA:
        raise _validate.fail(
            "in_scores and out_scores must come from canaries each included with probability "
            f"1/2 (their lengths differ more than fair coins allow: p={p:.2g})",
            "(len(in_scores), len(out_scores))", (n_in, n_out),
            "Include each canary by a fair coin, independent of everything else, and pass the "
            "scores of all of them.")


def _pairs(guesses, m: int) -> tuple[tuple[int, int], ...]:
    if guesses is None:
        return score_candidates(m)
    pairs = [guesses] if isinstance(guesses, tuple) else list(guesses)
    out = []
    for pair in pairs:
        kp, kn = (_validate.nonnegative_int("guesses", k, "Pass e.g. (50, 50).") for k in pair)
        if not 1 <= kp + kn <= m:
            raise _validate.fail(f"each guess pair must make between 1 and {m} guesses (one per "
                                 "canary at most)", "guesses", guesses,
                                 f"Pass e.g. ({max(1, m // 20)}, {max(1, m // 20)}), or None.")
        out.append((kp, kn))
    if not out:
        raise _validate.fail("guesses must not be empty", "guesses", guesses,
                             "Pass a pair such as (50, 50), or None.")
    return tuple(out)


def _best(bound, scores, included, pairs, m, delta, confidence) -> tuple[float, tuple, int]:
    conf = 1.0 - (1.0 - confidence) / len(pairs)
    best = (-1.0, pairs[0], 0)
    for kp, kn in pairs:
        v = count_correct(make_guesses(scores, kp, kn), included)
        found = bound(m, kp + kn, v, delta, conf)
        if found > best[0]:
            best = (float(found), (kp, kn), int(v))
    return best


def audit_scores(in_scores, out_scores, *, delta: float, confidence: float = 0.95,
                 family: str = "gaussian", guesses=None, bootstrap: int = 1000,
                 seed: int | None = None) -> ScoreAudit:
    """Audit an attack's scores of held-in and held-out canaries (higher: more likely "in").

    Args:
        in_scores: scores of the canaries that were in the training set.
        out_scores: scores of those that were not. Each canary must have been included by a
            fair coin, so the two lengths differ only as fair coins allow.
        delta: the delta the bounds are stated at (> 0 for ``family="gaussian"``).
        confidence: of the bounds and intervals, in (0, 1).
        family: the f-DP curves tested: ``"gaussian"`` (default) or ``"epsilon-delta"``
            (valid for any mechanism; see ``privgrad.auditing.fdp``).
        guesses: ``(num_positive, num_negative)`` fixed in advance, a list of them (best taken
            with a Bonferroni correction), or ``None``: ``k`` in + ``k`` out for ``k`` of 2.5%,
            5% and 10% of the canaries.
        bootstrap: resamples for the bootstrap intervals (0 for none).
        seed: seed of the bootstrap.

    Returns:
        A [`ScoreAudit`][privgrad.auditing.scores.ScoreAudit].

    Raises:
        ConfigError: empty or non-finite scores, lengths no fair coin gives, a confidence
            outside (0, 1), more guesses than canaries, ``delta = 0`` with the Gaussian family.

    Privacy:
        The bounds are valid when the scores are a function of what the audited run released
        and of randomness independent of the inclusion bits (``fdp``, ``statistics``). A bound
        above a claimed epsilon is evidence against the claim; one below it is no guarantee.
    """
    fam = check_family(family)
    x_in, x_out = _scores("in_scores", in_scores), _scores("out_scores", out_scores)
    conf = _check_confidence(confidence)
    d = check_delta_for(fam, delta)
    boots = _validate.nonnegative_int("bootstrap", bootstrap, "Pass e.g. 1000, or 0.")
    _check_balance(x_in.size, x_out.size)
    m = x_in.size + x_out.size
    pairs = _pairs(guesses, m)
    scores = np.concatenate([x_in, x_out])
    included = np.arange(m) < x_in.size
    fdp = lambda m_, r, v, dd, c: fdp_lower_bound(m_, r, v, dd, c, fam)
    eps, pair, correct = _best(fdp, scores, included, pairs, m, d, conf)
    eps1, pair1, correct1 = _best(one_run_lower_bound, scores, included, pairs, m, d, conf)
    corrected = 1.0 - (1.0 - conf) / len(pairs)
    mu = fdp_mu_lower_bound(m, sum(pair), correct, corrected) if fam == "gaussian" else None
    rng = np.random.default_rng(seed)

    def statistic(a, b):
        return [auc(a, b), *(tpr_at_fpr(a, b, f)[0] for f in FPRS)]

    boot = (bootstrap_interval(statistic, x_in, x_out, conf, boots, rng) if boots
            else np.full((1 + len(FPRS), 2), np.nan))
    rates = []
    for i, f in enumerate(FPRS):
        tpr, realised, tp = tpr_at_fpr(x_in, x_out, f)
        rates.append(RateAt(f, realised, tpr, clopper_pearson(tp, x_in.size, conf),
                            tuple(map(float, boot[1 + i]))))
    rule = ("fixed in advance" if len(pairs) == 1 else
            f"best of {len(pairs)} guess counts, Bonferroni-corrected")
    return ScoreAudit(
        epsilon=eps, mu=mu, epsilon_one_run=eps1,
        epsilon_clopper_pearson=epsilon_clopper_pearson(x_in, x_out, d, conf),
        family=fam, delta=d, confidence=conf, num_in=int(x_in.size), num_out=int(x_out.size),
        guesses=pair, num_correct=correct, guesses_one_run=pair1, num_correct_one_run=correct1,
        guess_rule=rule, ceiling=fdp(m, sum(pair), sum(pair), d, corrected),
        ceiling_one_run=one_run_lower_bound(m, sum(pair1), sum(pair1), d, corrected),
        tpr_at_fpr=tuple(rates), auc=auc(x_in, x_out), auc_bootstrap=tuple(map(float, boot[0])))
