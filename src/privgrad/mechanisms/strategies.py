"""The noise mechanisms as frozen values: ``DPSGD()``, ``BandMF(num_bands=b)``, ``BLT(num_buffers=k)``.

A mechanism says how the noise of ``n`` steps is correlated: the released iterates are
``A (x + sigma C^{-1} z)`` for the workload ``A`` (what the optimiser computes from the noisy
gradients), a lower-triangular strategy ``C`` (Toeplitz; for BandMF with its last ``b - 1``
columns rescaled) and independent standard normal draws ``z`` (times ``max_grad_norm``). Each mechanism gives

* ``coefficients(n)``: the first column of ``C`` (its nonzero part), normalised so that the
  sensitivity under the mechanism's participation pattern is exactly 1 per unit of clipping
  bound;
* ``expected_error(n)``: ``||A C^{-1}||_F^2 / n * sensitivity^2``, the mean over the ``n`` steps
  of the expected squared error of the iterate, per coordinate, in units of
  ``(sigma * max_grad_norm)^2`` (the definition of Choquette-Choo et al. 2023 and McKenna 2024);
  for DP-SGD on the prefix sum it is ``(n + 1) / 2``;
* ``noise(steps, like)``: the streaming generator of ``w = C^{-1} z``;
* ``event(noise_multiplier, sample_rate, steps)``: what the accountant records for the run.

Which mechanism gives less error at a given epsilon also depends on the accounting: compare
``sigma(epsilon)^2 * expected_error(n)``, with ``sigma`` calibrated on each mechanism's
``event``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privgrad import _validate
from privgrad.accounting.events import PoissonGaussian, Repeated
from privgrad.mechanisms import blt as _blt
from privgrad.mechanisms.accounting import (
    amplified_event,
    check_num_bands,
    check_steps,
    positive_int,
)
from privgrad.mechanisms.banded import banded_error, optimal_banded
from privgrad.mechanisms.streaming import BandedNoise, BufferedNoise, Draw
from privgrad.mechanisms.toeplitz import (
    DTYPE,
    WORKLOADS,
    materialize,
    mean_row_energy,
    series_inverse,
    series_mul,
    workload_coefficients,
)

__all__ = ["BLT", "DPSGD", "MECHANISMS", "BandMF", "MechanismWarning"]


class MechanismWarning(UserWarning):
    """A correlated-noise mechanism is expected to train with more noise than plain DP-SGD at
    the same epsilon (``make_private_with_epsilon`` compares them): allowed, private, and
    probably a worse model."""


def check_workload(workload: object) -> str:
    """``workload`` as one of ``WORKLOADS``."""
    return _validate.choice("workload", workload, WORKLOADS)


def check_momentum(momentum: object) -> float:
    """``momentum`` as float in [0, 1)."""
    fix = "Pass the optimiser's momentum (heavy ball), e.g. 0.9, or 0.0 for plain SGD."
    beta = _validate.finite_nonnegative("momentum", momentum, fix)
    if beta >= 1:
        raise _validate.fail("momentum must be in [0, 1)", "momentum", momentum, fix)
    return beta


def workload_momentum(workload: str, momentum: float) -> float:
    """The momentum that the workload really uses (0 for the prefix sum)."""
    return momentum if workload == "momentum" else 0.0


def strategy_matrix(coefficients: torch.Tensor, n: int) -> torch.Tensor:
    """The dense, column-normalised ``n x n`` strategy ``C`` (for inspection and tests)."""
    strategy = materialize(coefficients, n)
    return strategy / torch.linalg.vector_norm(strategy, dim=0, keepdim=True)


@dataclass(frozen=True)
class BandMF:
    """Banded matrix factorization (BandMF) with a banded Toeplitz strategy.

    ``C`` is lower triangular with ``num_bands`` nonzero diagonals, Toeplitz with first column
    ``(c_0, ..., c_{b-1}, 0, ...)`` (``c_0 > 0``, ``||c|| = 1``) and each column rescaled to L2
    norm exactly 1 (only the last ``b - 1`` columns, which ``n`` cuts short, change). The ``c``
    minimise ``expected_error(n)`` exactly (L-BFGS in float64 on the Toeplitz algebra of
    ``privgrad.mechanisms.banded``, started from the workload's Toeplitz square root), cached
    per process for each ``(num_bands, n, workload, momentum)``.

    Args:
        num_bands: ``b`` >= 1; also the number of sampling groups. ``b = 1`` is DP-SGD.
        workload: ``"prefix_sum"`` (SGD) or ``"momentum"`` (SGD with heavy-ball momentum; see
            ``privgrad.mechanisms.toeplitz.workload_coefficients``).
        momentum: ``beta`` in [0, 1) of the momentum workload (ignored for the prefix sum).

    Privacy:
        Sensitivity 1 per participation, exactly. Cyclic Poisson sampling with ``b`` groups
        lets a record take part only in steps ``g, g + b, g + 2b, ...``; taking part in step
        ``j`` adds column ``j`` of ``C`` times its clipped gradient, and that column is nonzero
        only in rows ``j .. j + b - 1`` and has norm exactly 1. Two participations are at least
        ``b`` steps apart, so their columns have disjoint supports: each participation changes
        its own block of rows by at most 1 (per unit of ``max_grad_norm``), and the blocks are
        released with independent noise (tested by brute force over every participation
        pattern of small ``n``). The accountant therefore records DP-SGD with ``ceil(n / b)``
        rounds at the group's sample rate (``event``; Choquette-Choo et al. 2023). Assumes the
        engine samples cyclically with ``num_bands`` groups fixed independently of the data,
        runs exactly the ``n`` steps the strategy was built for, and adds
        ``sigma * max_grad_norm * w_t`` from ``noise()`` to each step's summed clipped
        gradients.

    Cost: ``O(n log n + b^2)`` per L-BFGS evaluation, a few dozen evaluations. Measured on 2
    CPU cores (one thread used): ``n = 10^4`` and ``b`` in 4, 16, 64, 256 take 0.2 to 1.1 s
    for either workload, ``n = 10^3`` under 0.1 s (after the first call of the process);
    a cached strategy returns in about 30 microseconds.
    """

    num_bands: int
    workload: str = "prefix_sum"
    #: accounted per round of sampled steps (a round's event is the sampling's step event)
    amplified = True
    momentum: float = 0.9

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_bands", check_num_bands(self.num_bands))
        object.__setattr__(self, "workload", check_workload(self.workload))
        object.__setattr__(self, "momentum", check_momentum(self.momentum))

    def _check(self, n: object) -> int:
        n = check_steps(n)
        check_num_bands(self.num_bands, n)
        return n

    def coefficients(self, n: int) -> torch.Tensor:
        """The ``b`` band coefficients of ``C`` for ``n`` steps (float64, ``c_0 > 0``,
        ``||c|| = 1``; the last ``b - 1`` columns of ``C`` are rescaled to norm 1)."""
        n = self._check(n)
        beta = workload_momentum(self.workload, self.momentum)
        return torch.tensor(optimal_banded(self.num_bands, n, self.workload, beta), dtype=DTYPE)

    def matrix(self, n: int) -> torch.Tensor:
        """The dense ``n x n`` strategy ``C`` (columns of norm 1); for small ``n``."""
        return strategy_matrix(self.coefficients(n), self._check(n))

    def expected_error(self, n: int) -> float:
        """``||A C^{-1}||_F^2 / n`` at sensitivity 1: the mean squared error per step and
        coordinate, in units of ``(sigma * max_grad_norm)^2``."""
        n = self._check(n)
        a = workload_coefficients(self.workload, n, workload_momentum(self.workload, self.momentum))
        return float(banded_error(self.coefficients(n), n, a))

    def noise(self, steps: int, like: torch.Tensor, draw: Draw | None = None) -> BandedNoise:
        """The streaming generator of ``w = C^{-1} z`` for ``steps`` steps (``b - 1`` buffers
        of ``like``'s size)."""
        return BandedNoise(self.coefficients(steps), steps, like, draw)

    def event(self, noise_multiplier: float, sample_rate: float, steps: int) -> Repeated:
        """The run's privacy event: ``amplified_event`` with ``num_bands`` bands;
        ``sample_rate`` is the probability of drawing a record of the step's group."""
        return amplified_event(noise_multiplier, sample_rate, steps, self.num_bands)

    # what the engine needs to run it (see privgrad.mechanism_run)
    def num_groups(self, steps: int) -> int:
        """The cyclic sampler's groups: ``num_bands``."""
        self._check(steps)
        return self.num_bands

    def round_of(self, step: int) -> int:
        """The round of the reduction that sampler step ``step`` (from 0) belongs to."""
        return step // self.num_bands

    def round_event(self, noise_multiplier: float, sample_rate: float) -> PoissonGaussian:
        """What one round costs: one Poisson-subsampled Gaussian step at the group's rate."""
        return PoissonGaussian(noise_multiplier, sample_rate)


@dataclass(frozen=True)
class DPSGD:
    """Plain DP-SGD: independent noise every step (``C = I``); ``BandMF(num_bands=1)``.

    Args:
        workload: only for ``expected_error`` (comparing with the other mechanisms on the same
            workload); the noise does not depend on it.
        momentum: likewise.

    Privacy:
        Poisson sampling with ``sample_rate`` at every step; sensitivity 1 per step. ``noise``
        returns the draws unchanged, so the noise is bit for bit that of the draws' source.
    """

    workload: str = "prefix_sum"
    momentum: float = 0.9

    num_bands = 1  # not a field: DP-SGD is the one-band case
    amplified = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "workload", check_workload(self.workload))
        object.__setattr__(self, "momentum", check_momentum(self.momentum))

    def coefficients(self, n: int) -> torch.Tensor:
        """``[1.0]``: ``C`` is the identity."""
        check_steps(n)
        return torch.ones(1, dtype=DTYPE)

    def matrix(self, n: int) -> torch.Tensor:
        """The ``n x n`` identity."""
        return torch.eye(check_steps(n), dtype=DTYPE)

    def expected_error(self, n: int) -> float:
        """``||A||_F^2 / n``: ``(n + 1) / 2`` for the prefix sum."""
        n = check_steps(n)
        a = workload_coefficients(self.workload, n, workload_momentum(self.workload, self.momentum))
        weights = n - torch.arange(n, dtype=DTYPE)
        return float((weights * a * a).sum() / n)

    def noise(self, steps: int, like: torch.Tensor, draw: Draw | None = None) -> BandedNoise:
        """A pass-through generator: ``w_t = z_t``."""
        return BandedNoise(self.coefficients(steps), steps, like, draw)

    def event(self, noise_multiplier: float, sample_rate: float, steps: int) -> Repeated:
        """``steps`` Poisson-subsampled Gaussian steps: DP-SGD's event."""
        return amplified_event(noise_multiplier, sample_rate, steps, 1)

    def num_groups(self, steps: int) -> int:
        """1: plain Poisson sampling."""
        check_steps(steps)
        return 1

    def round_of(self, step: int) -> int:
        """Every step is its own round."""
        return step

    def round_event(self, noise_multiplier: float, sample_rate: float) -> PoissonGaussian:
        """One Poisson-subsampled Gaussian step."""
        return PoissonGaussian(noise_multiplier, sample_rate)


@dataclass(frozen=True)
class BLT:
    """A buffered linear Toeplitz (BLT) strategy: ``k`` buffers of noise state for any ``n``.

    ``C`` is the lower-triangular Toeplitz matrix with first column
    ``(1, sum_i omega_i, sum_i omega_i theta_i, ...) / s``; ``C^{-1}`` is again a BLT, and the
    noise needs ``k`` model-sized buffers (``BufferedNoise``) instead of BandMF's ``b - 1``. The
    ``2k`` decays minimise ``expected_error(n)`` (L-BFGS in float64 over interlaced decays, see
    ``privgrad.mechanisms.blt``), cached per process. ``parameters(n)`` gives them.

    Args:
        num_buffers: ``k`` >= 1.
        workload: as for ``BandMF``.
        momentum: as for ``BandMF``.
        min_sep: the participation pattern the sensitivity covers: a record takes part at most
            once every ``min_sep`` steps (``None``: at most once in the whole run).

    Privacy:
        ``s`` is the exact sensitivity of the raw BLT under the pattern (the coefficients are
        positive and decreasing, where the min-separation formula is exact; tested by brute
        force), so ``C`` has sensitivity exactly 1 over the *whole run*, all participations
        together. The accountant therefore records one Gaussian mechanism with noise multiplier
        ``sigma`` (``event``); no amplification by sampling is claimed (amplified accounting of
        BLTs needs the MMCC analysis of Choquette-Choo et al. 2024, not implemented here).
        Assumes a sampler that enforces the pattern (e.g. cyclic sampling with ``min_sep``
        groups), and clipped contributions.
    """

    num_buffers: int
    workload: str = "prefix_sum"
    momentum: float = 0.9
    min_sep: int | None = None
    #: one Gaussian mechanism for the whole run: no per-round sampled event
    amplified = False

    def __post_init__(self) -> None:
        k = positive_int("num_buffers", self.num_buffers,
                         "Pass the number of buffers k >= 1, e.g. BLT(num_buffers=4).")
        object.__setattr__(self, "num_buffers", k)
        object.__setattr__(self, "workload", check_workload(self.workload))
        object.__setattr__(self, "momentum", check_momentum(self.momentum))
        if self.min_sep is not None:
            sep = positive_int(
                "min_sep", self.min_sep,
                "Pass the fewest steps between two participations of a record (the number of "
                "sampling groups), or None for one participation in the whole run.")
            object.__setattr__(self, "min_sep", sep)

    def parameters(self, n: int) -> _blt.BLTParameters:
        """The optimised BLT pair for ``n`` steps, with ``scale`` normalising the sensitivity."""
        n = check_steps(n)
        beta = workload_momentum(self.workload, self.momentum)
        theta, theta_hat = _blt.optimal_blt(self.num_buffers, n, self.workload, beta, self.min_sep)
        return _blt.parameters_from(torch.tensor(theta, dtype=DTYPE),
                                    torch.tensor(theta_hat, dtype=DTYPE), n, self.min_sep)

    def coefficients(self, n: int) -> torch.Tensor:
        """The first ``n`` Toeplitz coefficients of ``C`` (sensitivity 1 under ``min_sep``): the
        inverse of the noise generator's ``C^{-1}``."""
        p = self.parameters(n)
        return series_inverse(_blt.blt_coefficients(p.theta_hat, p.omega_hat, n), n) / p.scale

    def matrix(self, n: int) -> torch.Tensor:
        """The dense ``n x n`` strategy ``C``; for small ``n``."""
        return materialize(self.coefficients(n), n)

    def expected_error(self, n: int) -> float:
        """``||A C^{-1}||_F^2 / n`` at sensitivity 1 (all participations together)."""
        p = self.parameters(n)
        a = workload_coefficients(self.workload, n, workload_momentum(self.workload, self.momentum))
        h = series_mul(a, _blt.blt_coefficients(p.theta_hat, p.omega_hat, n), n)
        return float(mean_row_energy(h, n) / n) * p.scale ** 2

    def noise(self, steps: int, like: torch.Tensor, draw: Draw | None = None) -> BufferedNoise:
        """The streaming generator of ``w = C^{-1} z`` (``k`` buffers of ``like``'s size)."""
        p = self.parameters(steps)
        return BufferedNoise(p.theta_hat, p.omega_hat, p.scale, steps, like, draw)

    def event(self, noise_multiplier: float, sample_rate: float, steps: int) -> Repeated:
        """One Gaussian mechanism for the whole run (``sample_rate`` is not used: no
        amplification is claimed; see the class docstring)."""
        check_steps(steps)
        return Repeated(PoissonGaussian(noise_multiplier, 1.0), 1)

    def num_groups(self, steps: int) -> int:
        """The cyclic sampler's groups: ``min_sep`` (a record's steps are ``min_sep`` apart),
        or ``steps`` with ``min_sep=None`` (each record in at most one step of the run)."""
        steps = check_steps(steps)
        if self.min_sep is not None and self.min_sep > steps:
            raise _validate.fail(
                f"min_sep must be <= the number of steps ({steps})", "min_sep", self.min_sep,
                f"Pass min_sep <= {steps}, or min_sep=None (one participation per record).")
        return self.min_sep if self.min_sep is not None else steps

    def round_of(self, step: int) -> int:
        """One round: the event covers the whole run at once."""
        return 0

    def round_event(self, noise_multiplier: float, sample_rate: float) -> PoissonGaussian:
        """The whole run: one Gaussian mechanism, no amplification (``sample_rate`` unused)."""
        return PoissonGaussian(noise_multiplier, 1.0)


#: The mechanisms by name (a literal table: what a checkpoint or a command line may name).
MECHANISMS = {"dpsgd": DPSGD, "bandmf": BandMF, "blt": BLT}
