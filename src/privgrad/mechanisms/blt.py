"""Buffered linear Toeplitz (BLT) strategies: ``k`` buffers instead of ``b - 1`` past draws.

A BLT (Dvijotham et al. 2024, "Efficient and near-optimal noise generation for streaming
differential privacy"; McMahan, Xu and Zhang 2024, "A hassle-free algorithm for private learning in practice:
don't use tree aggregation, use BLTs", for multiple participations) is
the lower-triangular Toeplitz matrix with first column ``c_0 = 1``,
``c_j = sum_i omega_i theta_i^(j-1)`` for ``j >= 1``: as a power series
``c(x) = 1 + sum_i omega_i x / (1 - theta_i x) = P(x) / Q(x)`` with
``Q(x) = prod_i (1 - theta_i x)`` and a numerator ``P(x) = prod_i (1 - theta_hat_i x)`` of the
same degree. So ``C^{-1}``, the series ``Q / P``, is again a BLT, with decays ``theta_hat`` and
output scales ``omega_hat``; matching the poles of the partial fractions gives

    ``omega_i = prod_j (theta_i - theta_hat_j) / prod_{j != i} (theta_i - theta_j)``,

and ``omega_hat`` likewise with the roles of ``theta`` and ``theta_hat`` swapped. We optimise
over the pair of decays, kept interlaced, ``1 > theta_1 > theta_hat_1 > theta_2 > ... >
theta_hat_k > 0`` (parametrised as ``exp(-cumsum(softplus(u)))``). Interlacing makes every
``omega_i > 0`` (each product has as many negative factors above as below), so ``C``'s
coefficients are positive and decreasing: the min-separation sensitivity formula of
``toeplitz.min_sep_sensitivity_squared`` is then exact, and ``C^{-1}`` is stable (decays < 1).

The strategy is normalised by a scalar ``s``, the sensitivity of the raw BLT under the
participation pattern, so its sensitivity is exactly 1; ``C^{-1} = s C_raw^{-1}``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from privgrad.mechanisms.toeplitz import (
    DTYPE,
    mean_row_energy,
    min_sep_sensitivity_squared,
    minimise,
    one_thread,
    series_inverse,
    series_mul,
    workload_coefficients,
)

__all__ = ["BLTParameters", "blt_coefficients", "blt_error", "optimal_blt"]

MAX_ITER = 200


class BLTParameters(NamedTuple):
    """A BLT strategy and its inverse (float64 tensors of ``k`` values, and the scale).

    Attributes:
        theta: decays of the raw strategy ``C_raw`` (``c_0 = 1``).
        omega: output scales of ``C_raw``.
        theta_hat: decays of ``C_raw^{-1}`` (the noise generator's buffers).
        omega_hat: output scales of ``C_raw^{-1}``.
        scale: ``s``, the raw strategy's sensitivity; the strategy is ``C = C_raw / s`` and the
            noise ``C^{-1} z = s C_raw^{-1} z``.
    """

    theta: torch.Tensor
    omega: torch.Tensor
    theta_hat: torch.Tensor
    omega_hat: torch.Tensor
    scale: float


def decays(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta, theta_hat)``, interlaced in (0, 1), from ``2k`` unconstrained reals."""
    x = torch.exp(-torch.cumsum(torch.nn.functional.softplus(u), 0))
    return x[0::2], x[1::2]


def unconstrained(theta: torch.Tensor, theta_hat: torch.Tensor) -> torch.Tensor:
    """The inverse of ``decays`` (for interlaced inputs)."""
    x = torch.stack([theta, theta_hat], 1).reshape(-1)
    gaps = -torch.diff(torch.log(x), prepend=torch.zeros(1, dtype=x.dtype))
    return torch.log(torch.expm1(gaps))


def output_scales(poles: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``omega_i = prod_j (poles_i - zeros_j) / prod_{j != i} (poles_i - poles_j)``."""
    numerator = torch.prod(poles.view(-1, 1) - zeros.view(1, -1), 1)
    between = poles.view(-1, 1) - poles.view(1, -1)
    between = between + torch.eye(poles.numel(), dtype=poles.dtype)  # 1 on the diagonal
    return numerator / torch.prod(between, 1)


def blt_coefficients(theta: torch.Tensor, omega: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` Toeplitz coefficients ``1, sum_i omega_i theta_i^(j-1), ...``."""
    j = torch.arange(max(n - 1, 0), dtype=theta.dtype)
    exponent = j.view(1, -1) * torch.log(theta).view(-1, 1)
    # powers below e^-80 (1.8e-35 of c_0) are set to 0: carried along they would reach
    # subnormal numbers in the products and the backward pass, which are slow on CPUs
    negligible = exponent < -80.0
    powers = torch.where(negligible, 0.0, torch.exp(exponent.masked_fill(negligible, 0.0)))
    return torch.cat([torch.ones(1, dtype=theta.dtype), omega @ powers])[:n]


def blt_error(u: torch.Tensor, n: int, a: torch.Tensor, min_sep: int | None) -> torch.Tensor:
    """``||A C^{-1}||_F^2 / n * sensitivity^2`` for the BLT with decays ``decays(u)``."""
    theta, theta_hat = decays(u)
    c = blt_coefficients(theta, output_scales(theta, theta_hat), n)
    inverse = blt_coefficients(theta_hat, output_scales(theta_hat, theta), n)
    h = series_mul(a, inverse, n)
    return mean_row_energy(h, n) / n * min_sep_sensitivity_squared(c, n, min_sep)


def _starts(k: int, n: int) -> list[torch.Tensor]:
    """Interlaced decays ``1 - g`` with the ``2k`` gaps ``g`` geometric over a few spans of
    time scales (from about one step to about ``n`` steps)."""
    out = []
    for low, high in ((2.0 / n, 0.5), (2.0 / n, 0.9), (0.5 / n, 0.5)):
        g = torch.logspace(math.log10(low), math.log10(high), 2 * k, dtype=DTYPE)
        x = 1.0 - g
        out.append(unconstrained(x[0::2], x[1::2]))
    return out


def _log_error(u: torch.Tensor, n: int, a: torch.Tensor, min_sep: int | None) -> torch.Tensor:
    return torch.log(blt_error(u, n, a, min_sep))


def optimise_blt(k: int, n: int, a: torch.Tensor, min_sep: int | None,
                 max_iter: int = MAX_ITER) -> torch.Tensor:
    """The ``2k`` unconstrained parameters minimising ``blt_error`` (L-BFGS from a few starts,
    the best kept)."""
    best, best_u = math.inf, None
    for start in _starts(k, n):
        u = start.clone().requires_grad_(True)
        value = minimise(functools.partial(_log_error, u, n, a, min_sep), u, max_iter=max_iter,
                         runs=2, tolerance_change=1e-11)
        if math.isfinite(value) and value < best:
            best, best_u = value, u.detach().clone()
    if best_u is None:  # pragma: no cover - every start diverged
        raise FloatingPointError(f"the BLT optimisation diverged for k={k}, n={n}")
    return best_u


def parameters_from(theta: torch.Tensor, theta_hat: torch.Tensor, n: int,
                    min_sep: int | None) -> BLTParameters:
    """The BLT pair for these decays, normalised to sensitivity 1 for ``n`` steps.

    The sensitivity is computed on the strategy the noise generator realises: the series
    inverse of ``C_raw^{-1}``'s coefficients (from ``theta_hat`` and ``omega_hat``), not on the
    closed form of ``C_raw``, so rounding in the partial fractions cannot make the released
    noise smaller than the sensitivity needs.
    """
    omega, omega_hat = output_scales(theta, theta_hat), output_scales(theta_hat, theta)
    strategy = series_inverse(blt_coefficients(theta_hat, omega_hat, n), n)
    scale = float(min_sep_sensitivity_squared(strategy, n, min_sep).sqrt())
    return BLTParameters(theta, omega, theta_hat, omega_hat, scale)


@functools.lru_cache(maxsize=64)
def optimal_blt(k: int, n: int, workload: str, momentum: float,
                min_sep: int | None) -> tuple[tuple[float, ...], ...]:
    """The optimised decays ``(theta, theta_hat)`` for these settings, cached per process."""
    with one_thread():
        a = workload_coefficients(workload, n, momentum)
        theta, theta_hat = decays(optimise_blt(k, n, a, min_sep))
    return tuple(theta.tolist()), tuple(theta_hat.tolist())
