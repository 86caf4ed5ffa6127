"""Rates of a membership attack from canary scores, with Clopper-Pearson and bootstrap intervals.

An attack scores every canary (higher: more likely a member) and calls "in" every score above a
threshold. Given the scores of held-in and held-out canaries, these functions give its TPR at a
fixed FPR (the threshold set from the held-out scores alone), the area under its ROC curve, exact
Clopper-Pearson intervals for a rate, and percentile-bootstrap intervals for any statistic of
the two score sets. NumPy and SciPy only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

__all__ = ["auc", "bootstrap_interval", "clopper_pearson", "epsilon_clopper_pearson",
           "tpr_at_fpr"]


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """The exact two-sided interval for a binomial rate: each side holds ``(1 - confidence) / 2``."""
    if trials == 0:
        return 0.0, 1.0
    a = (1.0 - confidence) / 2
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(a, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(stats.beta.ppf(1 - a, successes + 1,
                                                              trials - successes))
    return lo, hi


def _threshold(out_sorted: np.ndarray, fpr: float) -> float:
    """The smallest threshold whose share of held-out scores strictly above it is <= ``fpr``."""
    k = int(np.floor(fpr * out_sorted.size + 1e-9))  # false positives allowed
    return -np.inf if k >= out_sorted.size else float(out_sorted[out_sorted.size - k - 1])


def tpr_at_fpr(in_scores: np.ndarray, out_scores: np.ndarray, fpr: float
               ) -> tuple[float, float, int]:
    """``(tpr, realised_fpr, true_positives)`` of the threshold set on the held-out scores alone
    so that at most ``fpr`` of them lie above it (ties count as "out")."""
    t = _threshold(np.sort(out_scores), fpr)
    tp = int(np.count_nonzero(in_scores > t))
    return tp / in_scores.size, float(np.mean(out_scores > t)), tp


def auc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve: P[an in-score beats an out-score], ties counted half."""
    ranks = stats.rankdata(np.concatenate([in_scores, out_scores]))
    n_in, n_out = in_scores.size, out_scores.size
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def bootstrap_interval(statistic: Callable[[np.ndarray, np.ndarray], np.ndarray | float],
                       in_scores: np.ndarray, out_scores: np.ndarray, confidence: float,
                       samples: int, rng: np.random.Generator) -> np.ndarray:
    """Percentile-bootstrap interval(s) ``[[low, high], ...]`` of ``statistic(in, out)``, each
    score set resampled with replacement ``samples`` times (rows: the statistic's values).

    The interval describes the estimate's sampling spread; it is not a privacy guarantee.
    """
    values = np.array([np.atleast_1d(statistic(rng.choice(in_scores, in_scores.size),
                                               rng.choice(out_scores, out_scores.size)))
                       for _ in range(samples)], dtype=np.float64)
    a = (1.0 - confidence) / 2
    return np.quantile(values, [a, 1 - a], axis=0).T


def epsilon_clopper_pearson(in_scores: np.ndarray, out_scores: np.ndarray, delta: float,
                            confidence: float, fractions=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5)
                            ) -> float:
    """The classic estimate ``max ln((TPR_low - delta) / FPR_high)``, both directions, over the
    thresholds that call "in" the top ``fraction`` of all canaries, with Clopper-Pearson bounds
    Bonferroni-corrected over the thresholds, directions and the two rates.

    It treats canaries as independent trials: valid when each score comes from an independent
    run (the classic many-run audit); in a one-run audit it is an estimate, not a bound.
    """
    scores = np.concatenate([in_scores, out_scores])
    order = np.sort(scores)[::-1]
    n_in, n_out = in_scores.size, out_scores.size
    tests = 4 * len(fractions)  # thresholds x directions x (TPR, FPR)
    conf = 1.0 - 2 * (1.0 - confidence) / tests  # clopper_pearson splits it over two sides
    best = 0.0
    for f in fractions:
        k = max(1, min(scores.size - 1, round(f * scores.size)))
        t = order[k - 1]
        tp, fp = int(np.count_nonzero(in_scores >= t)), int(np.count_nonzero(out_scores >= t))
        for hit, n_hit, miss, n_miss in ((tp, n_in, fp, n_out), (n_out - fp, n_out, n_in - tp, n_in)):
            low = clopper_pearson(hit, n_hit, conf)[0]
            high = clopper_pearson(miss, n_miss, conf)[1]
            if low > delta and high > 0:
                best = max(best, float(np.log((low - delta) / high)))
    return best
