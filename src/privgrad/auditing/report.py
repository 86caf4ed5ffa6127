"""From what the canaries saw to a verdict: the audit report (NumPy only, no torch).

``evaluate()`` takes the white-box canary observations of one training run (which canaries were
included, what the run released on each canary coordinate at each step, and which canaries each
step's batch held) and puts side by side:

- the accountant's epsilon and the audited lower bound (with its ceiling);
- the band of lower bounds a correct implementation produces at the same settings (simulated);
- conformance tests on the canary coordinates: the noise is ``N(0, (sigma C)^2)`` per step, an
  included canary adds exactly ``C`` when sampled, canaries are sampled at rate ``q`` with
  ``Binomial(T, q)`` counts, and excluded canaries are never sampled.

The verdict is ``"violation"`` when the bound exceeds the accountant's epsilon, falls outside the
band, or a conformance test fails at ``alpha``; ``"consistent"`` otherwise.

``evaluate_scores()`` makes the same report from any per-canary scores, such as the losses of
black-box input canaries (``privgrad.auditing.input_canaries``). Nothing models such scores,
so that report has no band and no conformance tests: only a bound above the accountant's
epsilon is evidence of a violation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from privgrad import _validate
from privgrad.auditing.simulation import (
    AuditSettings,
    Band,
    GuessRule,
    choose_guesses,
    simulate_band,
)
from privgrad.auditing.statistics import (
    TestResult,
    binomial_test,
    bonferroni_lower_bound,
    ceiling,
    count_correct,
    difference_test,
    dispersion_test,
    make_guesses,
    mean_test,
    one_run_lower_bound,
    one_run_p_value,
    variance_test,
)

__all__ = ["AuditReport", "Observations", "VERDICTS", "WHITE_BOX", "evaluate", "evaluate_scores",
           "score_candidates"]

VERDICTS = ("consistent", "violation")
WHITE_BOX = "white-box gradient"  # the ``canary_kind`` of ``evaluate()``'s reports
_SUM_SCORE = "sum of the released values over all steps"
_SCORE_FRACTIONS = (0.025, 0.05, 0.1)  # default guesses of evaluate_scores, per side


@dataclass(frozen=True)
class Observations:
    """What the white-box auditor saw of one run.

    Attributes:
        included: ``(m,)`` bool, whether each canary was in the training set.
        released: ``(T, m)`` the released (noisy) clipped sum on each canary coordinate at each
            step, before division by the normaliser, in the parameter's units (so an included,
            sampled canary adds ``C``).
        sampled: ``(T, m)`` bool, which canaries each step's batch held (``None`` if unknown).
    """

    included: np.ndarray
    released: np.ndarray
    sampled: np.ndarray | None = None

    def __post_init__(self) -> None:
        m = np.shape(self.included)[0] if np.ndim(self.included) == 1 else -1
        if m < 1 or np.ndim(self.released) != 2 or np.shape(self.released)[1] != m:
            raise _validate.fail(
                "released must be (steps, m) for m canaries in included", "released.shape",
                np.shape(self.released), "Pass one row per step, one column per canary.")
        if self.sampled is not None and np.shape(self.sampled) != np.shape(self.released):
            raise _validate.fail("sampled must have the shape of released", "sampled.shape",
                                 np.shape(self.sampled), f"Pass {np.shape(self.released)}.")

    @property
    def steps(self) -> int:
        return int(np.shape(self.released)[0])

    def scores(self, max_grad_norm: float) -> np.ndarray:
        """Each canary's score: its coordinate's released sum over all steps, in units of ``C``."""
        return np.asarray(self.released, dtype=np.float64).sum(0) / max_grad_norm


@dataclass(frozen=True)
class AuditReport:
    """The audit of one run: numbers, band, conformance tests and verdict.

    Attributes:
        settings: the run's public settings.
        accountant_epsilon: the accountant's epsilon at ``settings.delta``.
        lower_bound: the audited epsilon lower bound at ``settings.confidence``.
        p_value: p-value of the observed guesses under the accountant's ``(epsilon, delta)``.
        guesses: ``(num_positive, num_negative)`` used for the bound.
        guess_rule: how the guesses were fixed, in words.
        num_correct: correct guesses among ``sum(guesses)``.
        ceiling: the bound if every guess were right (the most this audit can show).
        band: bounds of a correct implementation at these settings (``None`` where nothing
            models the scores, as for black-box canaries).
        tests: conformance tests on the canary coordinates (none for black-box canaries).
        alpha: significance level of each conformance test.
        included: number of canaries in the training set.
        verdict: ``"consistent"`` or ``"violation"``.
        evidence: the reasons for the verdict, one sentence each.
        canary_kind: which canaries were audited: ``"white-box gradient"`` or, for example,
            ``"black-box input"``.
        score: how each canary was scored, in words.
    """

    settings: AuditSettings
    accountant_epsilon: float
    lower_bound: float
    p_value: float
    guesses: tuple[int, int]
    guess_rule: str
    num_correct: int
    ceiling: float
    band: Band | None
    tests: tuple[TestResult, ...]
    alpha: float
    included: int
    verdict: str
    evidence: tuple[str, ...]
    canary_kind: str = WHITE_BOX
    score: str = _SUM_SCORE

    def to_dict(self) -> dict:
        """Plain JSON-ready values (an infinite epsilon becomes ``None``)."""
        out = asdict(self)
        out["tests"] = [dict(asdict(t), passed=t.passed(self.alpha)) for t in self.tests]
        return _finite(out)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def text(self) -> str:
        """A human-readable rendering, one screen."""
        s, b = self.settings, self.band
        kp, kn = self.guesses
        band = (f"a correct implementation gives [{b.low:.2f}, {b.high:.2f}], median "
                f"{b.median:.2f} ({b.coverage:.1%} of {b.simulations} simulated runs)"
                if b is not None else
                "none: nothing models these scores, so only a bound above the accountant's "
                "epsilon shows a violation")
        lines = [
            "privgrad audit: one-run canary audit (Steinke, Nasr & Jagielski 2023)",
            f"  run         sample_rate={s.sample_rate:.4g}  noise_multiplier={s.noise_multiplier:.4g}"
            f"  max_grad_norm={s.max_grad_norm:g}  steps={s.steps}  delta={s.delta:g}",
            f"  canaries    {s.num_canaries} {self.canary_kind} ({self.included} included), "
            f"scored by {self.score}",
            f"  guesses     {kp} in + {kn} out ({self.guess_rule}); {self.num_correct} of "
            f"{kp + kn} correct",
            f"  epsilon     accountant {_num(self.accountant_epsilon)}   audited lower bound "
            f"{self.lower_bound:.2f} ({s.confidence:.0%} confidence; p={self.p_value:.3g} "
            f"under the accountant's claim)",
            f"  band        {band}",
            f"  ceiling     {self.ceiling:.2f}: the most {kp + kn} guesses can show; a bound below "
            f"the accountant's epsilon is not a privacy guarantee",
        ]
        if self.tests:
            lines.append(f"conformance on the canary coordinates (each at alpha={self.alpha:g}):")
        width = max(len(t.name) for t in self.tests) if self.tests else 0
        for t in self.tests:
            mark = "ok" if t.passed(self.alpha) else "FAIL"
            lines.append(f"  {t.name:<{width}}  {t.claim:<43} expected {t.expected:<10.4g} "
                         f"observed {t.observed:<10.4g} p={t.p_value:<9.3g} {mark}")
        lines.append(f"verdict: {self.verdict}")
        lines += [f"  - {e}" for e in self.evidence]
        return "\n".join(lines)


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def conformance_tests(obs: Observations, settings: AuditSettings) -> tuple[TestResult, ...]:
    """The tests on the canary coordinates (see the module docstring)."""
    c, sigma, q = settings.max_grad_norm, settings.noise_multiplier, settings.sample_rate
    std = sigma * c
    released = np.asarray(obs.released, dtype=np.float64)
    included = np.asarray(obs.included, dtype=bool)
    out_values = released[:, ~included]  # excluded canaries: pure noise at every step
    tests = [
        variance_test("noise_std", "per-step noise std = sigma*C", out_values, std),
        mean_test("noise_mean", "per-step noise mean = 0", out_values, 0.0, std),
    ]
    if obs.sampled is None:
        return tuple(tests)
    sampled = np.asarray(obs.sampled, dtype=bool)
    inc_values, inc_sampled = released[:, included], sampled[:, included]
    counts = inc_sampled.sum(0)
    tests += [
        difference_test("contribution", "a sampled canary adds C", inc_values[inc_sampled],
                        inc_values[~inc_sampled], c, std),
        binomial_test("inclusion_rate", "included canaries sampled at rate q",
                      int(counts.sum()), inc_sampled.size, q),
        dispersion_test("inclusion_spread", "counts ~ Binomial(T, q): variance ratio 1",
                        counts, obs.steps, q),
        binomial_test("excluded_unsampled", "excluded canaries are never sampled",
                      int(sampled[:, ~included].sum()), sampled[:, ~included].size, 0.0),
    ]
    return tuple(tests)


def evaluate(obs: Observations, settings: AuditSettings, accountant_epsilon: float, *,
             guesses: tuple[int, int] | list[tuple[int, int]] | None = None,
             simulations: int = 2000, band_coverage: float = 0.998, alpha: float = 1e-3,
             seed: int | None = None) -> AuditReport:
    """Audit one run from its canary observations.

    Args:
        obs: the observations.
        settings: the run's public settings (``settings.steps`` must equal ``obs.steps``).
        accountant_epsilon: the accountant's epsilon at ``settings.delta``.
        guesses: ``(num_positive, num_negative)`` fixed in advance; a list of such pairs for the
            Bonferroni-corrected best of them; ``None`` (default) to fix them from a simulation
            of a correct implementation before looking at the run.
        simulations: simulated runs for the band (200 more choose the guesses).
        band_coverage: probability mass of a correct implementation inside the band.
        alpha: significance level of each conformance test (default 1e-3).
        seed: seed of the simulations (the band and the guess choice), for reproducibility.

    Returns:
        An [`AuditReport`][privgrad.auditing.report.AuditReport].

    Privacy:
        A "consistent" verdict means this run showed no evidence against the implementation; it
        is not a proof of privacy (see ``ceiling()``). A
        "violation" says the run does not behave like a correct DP-SGD with these settings.
    """
    if obs.steps != settings.steps or np.shape(obs.included)[0] != settings.num_canaries:
        raise _validate.fail(
            "the observations must match the settings", "(steps, canaries)",
            (obs.steps, int(np.shape(obs.included)[0])),
            f"Pass settings with steps={obs.steps} and num_canaries={np.shape(obs.included)[0]}.")
    eps = _validate.positive("accountant_epsilon", accountant_epsilon,
                             "Pass engine.get_epsilon(delta).", finite=False)
    alpha = _validate.open_unit("alpha", alpha, "Pass e.g. 1e-3.")
    rng = np.random.default_rng(seed)
    rule = _rule(guesses, settings, rng)
    bound, pair, correct, p_value, top = _lower_bound(
        obs.scores(settings.max_grad_norm), obs.included, rule, settings, eps)
    band = simulate_band(settings, rule, rng, simulations=simulations, coverage=band_coverage)
    tests = conformance_tests(obs, settings)
    verdict, evidence = _verdict(bound, eps, band, tests, alpha, settings.confidence)
    return AuditReport(settings, float(eps), bound, p_value, pair, rule.describe(), correct, top,
                       band, tests, alpha, int(np.count_nonzero(obs.included)), verdict, evidence)


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
    verdict, evidence = _verdict(bound, eps, None, (), 1e-3, settings.confidence)
    return AuditReport(settings, float(eps), bound, p_value, pair, rule.describe(), correct, top,
                       None, (), 1e-3, int(np.count_nonzero(bits)), verdict, evidence,
                       canary_kind=str(canary_kind), score=str(score))


def _lower_bound(scores: np.ndarray, included: np.ndarray, rule: GuessRule,
                 settings: AuditSettings, eps: float) -> tuple[float, tuple[int, int], int, float,
                                                               float]:
    """``(bound, pair, correct, p_value, ceiling)`` of the scores under the guess rule."""
    m, d, conf = settings.num_canaries, settings.delta, settings.confidence
    included = np.asarray(included, dtype=bool)
    if rule.bonferroni:
        bound, pair, correct = bonferroni_lower_bound(scores, included, rule.candidates, d, conf)
        factor = len(rule.candidates)
    else:
        pair = rule.candidates[0]
        correct = count_correct(make_guesses(scores, *pair), included)
        bound = one_run_lower_bound(m, sum(pair), correct, d, conf)
        factor = 1
    p_value = 1.0 if math.isinf(eps) else min(
        1.0, factor * one_run_p_value(m, sum(pair), correct, min(eps, 50.0), d))
    top = ceiling(m, sum(pair), d, 1 - (1 - conf) / factor)
    return float(bound), pair, int(correct), float(p_value), float(top)


def _rule(guesses, settings: AuditSettings, rng: np.random.Generator | None) -> GuessRule:
    if guesses is None:
        return choose_guesses(settings, rng)
    pairs = [guesses] if isinstance(guesses, tuple) else list(guesses)
    for kp, kn in pairs:
        if kp + kn < 1 or kp + kn > settings.num_canaries:
            raise _validate.fail(
                f"each guess pair must make between 1 and {settings.num_canaries} guesses",
                "guesses", guesses, "Pass e.g. (50, 50), or None to choose by simulation.")
    return GuessRule(tuple((int(kp), int(kn)) for kp, kn in pairs), chosen_by="given")


def _verdict(bound: float, eps: float, band: Band | None, tests, alpha: float, confidence: float
             ) -> tuple[str, tuple[str, ...]]:
    bad = []
    if bound > eps:
        bad.append(f"the audited lower bound {bound:.2f} exceeds the accountant's epsilon "
                   f"{eps:.2f}: at {confidence:.0%} confidence the run is not as private as "
                   f"accounted")
    if band is not None and bound > band.high + 1e-9:
        bad.append(f"the bound {bound:.2f} is above the band [{band.low:.2f}, {band.high:.2f}] "
                   f"of a correct implementation: the canaries leak more than DP-SGD with these "
                   f"settings allows")
    elif band is not None and bound < band.low - 1e-9:
        bad.append(f"the bound {bound:.2f} is below the band [{band.low:.2f}, {band.high:.2f}] "
                   f"of a correct implementation: the canaries leak less than they should, so "
                   f"the run does not match its settings (or the canaries do not reach C)")
    for t in tests:
        if not t.passed(alpha):
            bad.append(f"{t.name}: expected {t.claim}; observed {t.observed:.4g} against "
                       f"{t.expected:.4g} (p={t.p_value:.3g}, {t.samples} values)")
    if bad:
        return "violation", tuple(bad)
    if band is None:
        return "consistent", (
            f"lower bound {bound:.2f} <= accountant epsilon {eps:.2f}; without a band or "
            f"conformance tests this is all these canaries can check",)
    return "consistent", (
        f"lower bound {bound:.2f} <= accountant epsilon {eps:.2f}, inside the band "
        f"[{band.low:.2f}, {band.high:.2f}], and all {len(tests)} conformance tests pass",)
