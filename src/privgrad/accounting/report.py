"""A privacy report a person can read: what the best membership attack can do to this run.

[`privacy_report()`][privgrad.accounting.report.privacy_report] turns an accountant's history into
epsilon at several deltas, the trade-off curve of the best membership attack (its false-negative
rate against its false-positive rate, ``privgrad.accounting.tradeoff``), its true-positive rate at
FPR 0.1%, 1% and 10%, its advantage ``max(TPR - FPR)``, and the Gaussian-DP ``mu`` that sums the
curve up in one number, with how far the curve is from that ``mu``'s. This is what
``engine.privacy_report(delta)`` and ``privgrad epsilon --report`` show. No torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from privgrad.accounting.accountant import Accountant, check_delta
from privgrad.accounting.events import is_nonprivate
from privgrad.accounting.tradeoff import TradeOffCurve, gdp_tradeoff, tradeoff_curve

__all__ = ["REPORT_FPRS", "PrivacyReport", "gaussian_dp_mu", "privacy_report"]

#: The false-positive rates at which the report states the best attack's true-positive rate.
REPORT_FPRS = (0.001, 0.01, 0.1)
#: FPRs of the curve's points: 0, log-spaced from 1e-6, and every 1% (225 points).
CURVE_FPRS = tuple(np.unique(np.concatenate([[0.0], np.logspace(-6, 0, 125),
                                             np.linspace(0, 1, 101)])).tolist())


def gaussian_dp_mu(history) -> tuple[float, bool]:
    """``(mu, exact)``: the Gaussian-DP parameter of a history of DP-SGD runs.

    Without subsampling, ``n`` Gaussian steps with noise ``sigma`` are exactly
    ``sqrt(sum(n / sigma^2))``-GDP (``exact=True``). With Poisson subsampling the composition
    tends to ``mu = sqrt(sum(n q^2 (e^(1/sigma^2) - 1)))``-GDP as the steps grow (the central
    limit theorem of Bu, Dong, Long and Su 2020; ``exact=False``): an approximation, neither an
    upper nor a lower bound. ``(inf, True)`` when a step had no noise; ``(0, True)`` for none.
    """
    if any(is_nonprivate(s) for s, _, _ in history):
        return math.inf, True
    exact = all(q == 1.0 for _, q, _ in history)
    if exact:
        return math.sqrt(sum(n / s**2 for s, _, n in history)), True
    total = 0.0
    for s, q, n in history:
        inv = 1.0 / s**2
        total += n * q * q * (math.expm1(inv) if inv < 700 else math.inf)
    return math.sqrt(total), False


@dataclass(frozen=True)
class PrivacyReport:
    """What the recorded steps allow the best membership attack to do.

    Attributes:
        accountant: the accountant that gave the epsilons (``"pld"`` or ``"rdp"``).
        steps: Gaussian steps recorded (training steps, and any release made with
            ``PrivacyEngine.release_sum``, each one step at sample rate 1).
        delta: the delta the report was asked for.
        epsilon: the accountant's epsilon at ``delta``.
        epsilons: ``((delta, epsilon), ...)`` at several deltas, ``delta`` among them.
        tpr_at_fpr: ``((fpr, tpr), ...)``: the best attack's TPR at FPR 0.1%, 1% and 10%.
        advantage: the best attack's ``max(TPR - FPR)``, the total-variation distance; it
            guesses membership at prior 1/2 right with probability ``(1 + advantage) / 2``.
        mu: the Gaussian-DP parameter (``gaussian_dp_mu()``).
        mu_exact: whether ``mu`` is exact (no subsampling) or the central-limit approximation.
        mu_gap: the largest difference, over all FPRs, between the TPR of the curve and that of
            ``mu``-GDP: how well the one number describes the run.
        curve: ``((fpr, fnr), ...)`` points of the trade-off curve, FPR from 0 to 1.

    Privacy:
        The curve and the TPRs come from privgrad's PLD accountant on the recorded history
        (whichever accountant gave the epsilons) and are pessimistic: no attack on a correct
        implementation does better. They assume what the accountant assumes
        (``privgrad.accounting.events``).
    """

    accountant: str
    steps: int
    delta: float
    epsilon: float
    epsilons: tuple[tuple[float, float], ...]
    tpr_at_fpr: tuple[tuple[float, float], ...]
    advantage: float
    mu: float
    mu_exact: bool
    mu_gap: float
    curve: tuple[tuple[float, float], ...]

    def to_dict(self) -> dict:
        """Plain JSON-ready values; the curve as ``{"fpr": ..., "tpr": ...}`` points and an
        infinite value as ``None``."""
        def num(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "accountant": self.accountant, "steps": self.steps, "delta": self.delta,
            "epsilon": num(self.epsilon),
            "epsilons": [{"delta": d, "epsilon": num(e)} for d, e in self.epsilons],
            "tpr_at_fpr": [{"fpr": f, "tpr": t} for f, t in self.tpr_at_fpr],
            "advantage": self.advantage, "gaussian_dp_mu": num(self.mu),
            "gaussian_dp_mu_exact": self.mu_exact, "gaussian_dp_mu_tpr_gap": self.mu_gap,
            "tradeoff": [{"fpr": f, "tpr": 1.0 - b} for f, b in self.curve],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def figure(self):
        """The curve as a matplotlib ``Figure`` (needs the ``plot`` extra): FNR against FPR beside
        the curves of perfect privacy (``FNR = 1 - FPR``) and of no privacy (``FNR = 0``), and the
        TPR on log axes for the low-FPR end, with Gaussian-DP at ``mu``. No pyplot state is
        touched; ``report.figure().savefig("curve.png")`` writes it."""
        from matplotlib.figure import Figure

        from privgrad.accounting.tradeoff import gdp_tradeoff

        fpr, fnr = (np.array(v) for v in zip(*self.curve))
        fig = Figure(figsize=(10, 4.5))
        left, right = fig.subplots(1, 2)
        left.plot(fpr, 1 - fpr, color="tab:green", ls="--", label="perfect privacy (FNR = 1 - FPR)")
        left.plot([0, 1], [0, 0], color="tab:red", ls="--", label="no privacy (FNR = 0)")
        left.plot(fpr, fnr, color="tab:blue", lw=2, label=f"this run (epsilon {self.epsilon:.3g})")
        left.set(xlabel="false-positive rate", ylabel="false-negative rate of the best attack")
        left.set_title("trade-off curve: no attack goes below it", fontsize=10)
        pos = fpr > 0
        x = fpr[pos]
        right.loglog(x, x, color="tab:green", ls="--", label="perfect privacy (TPR = FPR)")
        right.loglog(x, np.ones(x.size), color="tab:red", ls="--", label="no privacy (TPR = 1)")
        right.loglog(x, np.maximum(1 - fnr[pos], 1e-12), color="tab:blue", lw=2, label="this run")
        if math.isfinite(self.mu) and self.mu > 0:
            approx = "" if self.mu_exact else ", approx."
            right.loglog(x, 1 - gdp_tradeoff(self.mu, x), color="gray", ls=":",
                         label=f"Gaussian-DP mu = {self.mu:.3g}{approx}")
        right.set(xlabel="false-positive rate", ylabel="true-positive rate of the best attack")
        right.set_title("the same at low false-positive rates", fontsize=10)
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"best membership attack after {self.steps} steps "
                     f"(delta = {self.delta:g}: epsilon {self.epsilon:.3g})", fontsize=11)
        fig.tight_layout()
        return fig

    def text(self) -> str:
        """A human-readable rendering, one screen."""
        eps = "  ".join(f"{_num(e)} at {d:g}" for d, e in self.epsilons)
        tprs = "  ".join(f"{t:.2%} at FPR {f:g}" for f, t in self.tpr_at_fpr)
        how = "exact: no subsampling" if self.mu_exact else (
            "central-limit approximation of subsampling; its TPR is within "
            f"{self.mu_gap:.3f} of the curve's at every FPR")
        return "\n".join([
            f"privacy report: {self.steps} steps, {self.accountant.upper()} accountant",
            f"  epsilon      {_num(self.epsilon)} at delta={self.delta:g}   ({eps})",
            f"  best attack  TPR {tprs}",
            (f"  advantage    {self.advantage:.4f}: max TPR - FPR; at prior 1/2 it guesses "
             f"membership right {(1 + self.advantage) / 2:.2%} of the time (50% is a coin)"),
            f"  Gaussian-DP  mu={_num(self.mu, 3)} ({how})",
            "  the curve    perfect privacy is TPR = FPR; no privacy is TPR = 1 at every FPR",
        ])


def _num(x: float, digits: int = 2) -> str:
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def _deltas(delta: float, deltas) -> tuple[float, ...]:
    if deltas is None:
        deltas = (delta * 10, delta, delta / 10, delta / 100)
    return tuple(sorted({check_delta(float(f"{d:.12g}")) for d in (*deltas, delta) if d < 1},
                        reverse=True))


def privacy_report(accountant: Accountant, *, delta: float, deltas=None) -> PrivacyReport:
    """The report of everything ``accountant`` recorded.

    Args:
        accountant: any privgrad accountant (``engine.accountant``).
        delta: the delta of the headline epsilon, in (0, 1).
        deltas: the deltas of the epsilon table (default ``10 delta, delta, delta/10,
            delta/100``; ``delta`` is always added).

    Returns:
        A [`PrivacyReport`][privgrad.accounting.report.PrivacyReport].

    Raises:
        ConfigError: a delta outside (0, 1).

    Privacy:
        See [`PrivacyReport`][privgrad.accounting.report.PrivacyReport].
    """
    delta = check_delta(delta)
    table = _deltas(delta, deltas)
    curve: TradeOffCurve = tradeoff_curve(accountant)
    fprs = np.asarray(CURVE_FPRS)
    fnrs = np.asarray(curve.fnr(fprs))
    mu, exact = gaussian_dp_mu(accountant.history)
    if math.isfinite(mu):
        gap = float(np.max(np.abs(fnrs - gdp_tradeoff(mu, fprs))))
    else:
        gap = float(np.max(np.abs(fnrs)))
    return PrivacyReport(
        accountant=accountant.name, steps=accountant.steps, delta=delta,
        epsilon=accountant.get_epsilon(delta),
        epsilons=tuple((d, accountant.get_epsilon(d)) for d in table),
        tpr_at_fpr=tuple((f, float(curve.tpr(f))) for f in REPORT_FPRS),
        advantage=curve.advantage, mu=mu, mu_exact=exact, mu_gap=gap,
        curve=tuple(zip(fprs.tolist(), fnrs.tolist())))
