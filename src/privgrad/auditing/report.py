"""From what the canaries saw to a verdict: the audit report (NumPy only, no torch).

``evaluate()`` takes the white-box canary observations of one training run (which canaries were
included, what the run released on each canary coordinate at each step, and which canaries each
step's batch held) and puts side by side:

- the accountant's epsilon and the audited lower bound (with its ceiling), and beside it the
  f-DP bound of Mahloujifar, Melis and Chaudhuri (2024) on the same scores (``fdp``), with its
  own guesses, ceiling and band;
- the band of lower bounds a correct implementation produces at the same settings (simulated);
- conformance tests on the canary coordinates: the noise is ``N(0, (sigma C)^2)`` per step, an
  included canary adds exactly ``C`` when sampled, canaries are sampled at rate ``q`` with
  ``Binomial(T, q)`` counts, and excluded canaries are never sampled.

The verdict is ``"violation"`` when either bound exceeds the accountant's epsilon, the one-run
bound falls outside its band or the f-DP bound above its band, or a conformance test fails at
``alpha``; ``"consistent"`` otherwise.

``privgrad.auditing.scores.evaluate_scores()`` makes the same report from any per-canary scores,
such as the losses of black-box input canaries.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from privgrad import _validate
from privgrad.auditing.conformance import conformance_tests
from privgrad.auditing.fdp import fdp_p_value
from privgrad.auditing.simulation import (
    METHODS,
    AuditSettings,
    Band,
    GuessRule,
    choose_guesses,
    simulate_band,
)
from privgrad.auditing.statistics import (
    TestResult,
    count_correct,
    make_guesses,
    one_run_p_value,
)

__all__ = ["VERDICTS", "WHITE_BOX", "AuditReport", "FDPBound", "Observations", "conformance_tests",
           "evaluate"]

VERDICTS = ("consistent", "violation")
WHITE_BOX = "white-box gradient"  # the ``canary_kind`` of ``evaluate()``'s reports
_SUM_SCORE = "sum of the released values over all steps"


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
class FDPBound:
    """The f-DP lower bound (``privgrad.auditing.fdp``) on the report's canary scores.

    Attributes:
        lower_bound: epsilon at the report's delta whose Gaussian-DP curve the guesses reject
            at the report's confidence.
        p_value: p-value of the guesses under the Gaussian-DP curve with the accountant's
            ``(epsilon, delta)``.
        guesses: ``(num_positive, num_negative)`` used (fixed in advance by simulating this
            bound, like the one-run bound's).
        num_correct: correct guesses among them.
        ceiling: the bound if every guess were right.
        band: f-DP bounds of a correct implementation (``None`` where nothing models the scores).
        family: the family of curves (``"gaussian"``).
    """

    lower_bound: float
    p_value: float
    guesses: tuple[int, int]
    num_correct: int
    ceiling: float
    band: Band | None
    family: str = "gaussian"


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
        fdp: the f-DP bound on the same scores (``None`` only in reports built by hand).
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
    fdp: FDPBound | None = None

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
            *([] if self.fdp is None else [_fdp_line(self.fdp, s.confidence)]),
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


def _fdp_line(f: FDPBound, confidence: float) -> str:
    band = "" if f.band is None else f", band [{f.band.low:.2f}, {f.band.high:.2f}]"
    return (f"  f-DP        lower bound {f.lower_bound:.2f} ({confidence:.0%}; Gaussian-DP curves, "
            f"Mahloujifar et al. 2024): {f.guesses[0]} in + {f.guesses[1]} out, {f.num_correct} "
            f"correct; p={f.p_value:.3g}; ceiling {f.ceiling:.2f}{band}")


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
    fdp_rule = choose_guesses(settings, rng, method="f-DP") if guesses is None else rule
    fdp = _fdp(obs.scores(settings.max_grad_norm), obs.included, fdp_rule, settings, eps,
               simulate_band(settings, fdp_rule, rng, simulations=simulations,
                             coverage=band_coverage, method="f-DP"))
    verdict, evidence = _verdict(bound, eps, band, tests, alpha, settings.confidence, fdp)
    return AuditReport(settings, float(eps), bound, p_value, pair, rule.describe(), correct, top,
                       band, tests, alpha, int(np.count_nonzero(obs.included)), verdict, evidence,
                       fdp=fdp)


def _lower_bound(scores: np.ndarray, included: np.ndarray, rule: GuessRule,
                 settings: AuditSettings, eps: float, method: str = "one-run"
                 ) -> tuple[float, tuple[int, int], int, float, float]:
    """``(bound, pair, correct, p_value, ceiling)`` of the scores under the guess rule, by
    ``method``; several candidate pairs are each tested at a Bonferroni-corrected level."""
    m, d, factor = settings.num_canaries, settings.delta, len(rule.candidates)
    conf = 1.0 - (1.0 - settings.confidence) / factor
    included, bound_of = np.asarray(included, dtype=bool), METHODS[method]
    best = (-1.0, rule.candidates[0], 0)
    for kp, kn in rule.candidates:
        v = count_correct(make_guesses(scores, kp, kn), included)
        found = bound_of(m, kp + kn, v, d, conf)
        if found > best[0]:
            best = (found, (int(kp), int(kn)), int(v))
    bound, pair, correct = best
    p_of = one_run_p_value if method == "one-run" else fdp_p_value
    p_value = 1.0 if math.isinf(eps) else min(1.0, factor * p_of(m, sum(pair), correct,
                                                                 min(eps, 50.0), d))
    top = bound_of(m, sum(pair), sum(pair), d, conf)
    return float(bound), pair, int(correct), float(p_value), float(top)


def _fdp(scores, included, rule: GuessRule, settings: AuditSettings, eps: float,
         band: Band | None) -> FDPBound:
    bound, pair, correct, p_value, top = _lower_bound(
        np.asarray(scores, dtype=np.float64), included, rule, settings, eps, "f-DP")
    return FDPBound(bound, p_value, pair, correct, top, band)


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


def _verdict(bound: float, eps: float, band: Band | None, tests, alpha: float, confidence: float,
             fdp: FDPBound | None = None) -> tuple[str, tuple[str, ...]]:
    bad = []
    if fdp is not None and fdp.lower_bound > eps:
        bad.append(f"the f-DP lower bound {fdp.lower_bound:.2f} exceeds the accountant's epsilon "
                   f"{eps:.2f}: at {confidence:.0%} confidence the run is less private than a "
                   f"Gaussian mechanism with that epsilon")
    if fdp is not None and fdp.band is not None and fdp.lower_bound > fdp.band.high + 1e-9:
        bad.append(f"the f-DP bound {fdp.lower_bound:.2f} is above its band [{fdp.band.low:.2f}, "
                   f"{fdp.band.high:.2f}] of a correct implementation")
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
            f"lower bound {bound:.2f}{_and_fdp(fdp)} <= accountant epsilon {eps:.2f}; without a band or "
            f"conformance tests this is all these canaries can check",)
    return "consistent", (
        f"lower bound {bound:.2f}{_and_fdp(fdp)} <= accountant epsilon {eps:.2f}, inside the band "
        f"[{band.low:.2f}, {band.high:.2f}], and all {len(tests)} conformance tests pass",)


def _and_fdp(fdp: FDPBound | None) -> str:
    return "" if fdp is None else f" (f-DP {fdp.lower_bound:.2f})"


def __getattr__(name: str):
    # evaluate_scores and score_candidates moved to privgrad.auditing.scores (which imports this
    # module): still importable from here for code written before.
    if name in ("evaluate_scores", "score_candidates"):
        from privgrad.auditing import scores

        return getattr(scores, name)
    raise AttributeError(f"module 'privgrad.auditing.report' has no attribute {name!r}")
