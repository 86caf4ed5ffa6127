"""Banded Toeplitz strategies (BandMF): their exact error and their optimisation, in torch float64.

The strategy for ``n`` steps and ``b`` bands is the lower-triangular ``n x n`` matrix ``C = T D``:
``T`` is Toeplitz with first column ``(c_0, ..., c_{b-1}, 0, ..., 0)`` (``c_0 > 0``,
``||c||_2 = 1``) and ``D`` rescales each column to L2 norm 1 (only the last ``b - 1`` columns,
which ``n`` cuts short, change). The mechanism releases ``A x + sigma B z`` with
``B = A C^{-1}`` for the workload ``A`` (see ``toeplitz.workload_coefficients``); its expected
squared error per step is, in units of ``(sigma * max_grad_norm)^2``,

    ``error(C) = ||A C^{-1}||_F^2 / n * sensitivity(C)^2``,

the definition of Choquette-Choo et al. 2023 ("Amplified banded matrix factorization") and
McKenna 2024 ("Scaling up the banded matrix factorization mechanism"), with the mean over the
``n`` steps. Here ``sensitivity(C) = 1``: see ``BandMF`` for why (every column of ``C`` has norm 1
and, under cyclic participation with ``b`` groups, the columns of one example's participations
have disjoint supports).

Computing the error without forming ``n x n`` matrices: ``C^{-1} = D^{-1} T^{-1}``, where
``T^{-1}`` and ``A T^{-1}`` are Toeplitz (first columns ``1/c`` and ``a/c`` as power series) and
``D^{-1}`` differs from ``||c|| I`` only in its last ``b - 1`` entries; ``banded_error`` expands
the Frobenius norm around the Toeplitz part. Cost per evaluation: ``O(n log n + b^2)``.
"""

from __future__ import annotations

import functools

import torch

from privgrad.mechanisms.toeplitz import (
    DTYPE,
    column_norms,
    materialize,
    mean_row_energy,
    minimise,
    one_thread,
    prefix_sqrt,
    series_inverse,
    series_mul,
    workload_coefficients,
)

__all__ = ["banded_error", "optimal_banded", "optimise_banded"]

#: L-BFGS settings of the optimiser (iterations per run, and up to how many restarts of it).
MAX_ITER = 400
RESTARTS = 3


def correlate(x: torch.Tensor, y: torch.Tensor, lags: int) -> torch.Tensor:
    """``out[d] = sum_m x[m + d] y[m]`` for ``d < lags`` (needs ``len(x) >= len(y) + lags - 1``):
    directly for few lags, else by FFT."""
    if lags <= 64:
        return torch.nn.functional.conv1d(x.view(1, 1, -1), y.view(1, 1, -1)).view(-1)[:lags]
    size = 1 << (x.numel() + y.numel()).bit_length()
    spectrum = torch.fft.rfft(x, size) * torch.conj(torch.fft.rfft(y, size))
    return torch.fft.irfft(spectrum, size)[:lags]


def banded_error(c: torch.Tensor, n: int, a: torch.Tensor) -> torch.Tensor:
    """``||A C^{-1}||_F^2 / n`` for the column-normalised banded Toeplitz ``C`` built from ``c``.

    With ``s = ||c||`` and ``D^{-1} = s I + E`` (``E`` nonzero on the last ``L = b - 1`` steps
    ``J``), ``A C^{-1} = s H + A E T^{-1}`` with the Toeplitz ``H = A T^{-1}`` (first column
    ``h``), so ``||A C^{-1}||_F^2 = s^2 ||H||_F^2 + 2 s <H, A E T^{-1}> + ||A E T^{-1}||_F^2``:

    * ``||H||_F^2 = sum_k (n - k) h_k^2``;
    * ``<H, A E T^{-1}> = sum_{j in J} e_j sum_{t >= j} a_{t-j} sum_{m <= j} h_{m+t-j} tinv_m``;
    * ``||A E T^{-1}||^2 = sum_{j, j' in J} e_j e_j' G[j, j'] P[j, j']`` with
      ``G = sum_{t >= max(j, j')} a_{t-j} a_{t-j'}`` and
      ``P = sum_{m <= min(j, j')} tinv_m tinv_{m+|j-j'|}``.

    The sums over ``m`` split into a correlation over ``m < n - L`` (one convolution for all
    lags) and ``L x L`` cumulative sums over the last ``L`` steps: ``O(n log n + b^2)`` time and
    memory per evaluation.

    Args:
        c: the ``b`` band coefficients (any scale; ``c_0 != 0``), float64, may require grad.
        n: the number of steps (``n >= b``).
        a: the workload's first column, ``n`` coefficients.

    Returns:
        A 0-dimensional float64 tensor: the mean squared error per step at sensitivity 1. It
        does not depend on the scale of ``c``.
    """
    b = c.numel()
    scale = torch.linalg.vector_norm(c)
    tinv = series_inverse(c, n)
    h = series_mul(a, tinv, n)
    total = scale * scale * mean_row_energy(h, n)
    if b == 1:
        return total / n
    lags, head = b - 1, n - b + 1
    change = column_norms(c, n)[head:] - scale  # e_j for j = head .. n-1
    d = torch.arange(lags).view(-1, 1)  # lag (rows of the tables)
    m = torch.arange(lags).view(1, -1)  # position in the last L steps (columns)
    valid = d + m < lags
    index = (d + m).clamp(max=lags - 1)
    zero = torch.zeros((), dtype=c.dtype)
    window = tinv[head:].view(1, -1)  # tinv_m for m = head .. n-1
    # cross[d, r] = sum_{m <= head + r} h_{m+d} tinv_m ; auto[d, q] likewise with tinv_{m+d}
    cross = correlate(h, tinv[:head], lags).view(-1, 1) + torch.cumsum(
        torch.where(valid, h[head:][index], zero) * window, 1)
    auto = correlate(tinv, tinv[:head], lags).view(-1, 1) + torch.cumsum(
        torch.where(valid, tinv[head:][index], zero) * window, 1)
    # <H, A E T^{-1}>: r = j - head, d = t - j, r + d < L
    inner = (torch.where(valid, a[:lags].view(-1, 1) * cross, zero) * change.view(1, -1)).sum()
    # ||A E T^{-1}||^2 from the L x L tables G and P
    products = torch.cumsum(torch.where(valid, a[:lags].view(1, -1) * a[:lags][index], zero), 1)
    r = torch.arange(lags)
    lag = (r.view(-1, 1) - r.view(1, -1)).abs()
    low = torch.minimum(r.view(-1, 1), r.view(1, -1))
    high = torch.maximum(r.view(-1, 1), r.view(1, -1))
    gram = products[lag, lags - 1 - high] * auto[lag, low]
    total = total + 2 * scale * inner + change @ gram @ change
    return total / n


def dense_error(c: torch.Tensor, n: int, a: torch.Tensor) -> torch.Tensor:
    """``banded_error`` by dense ``n x n`` algebra (the reference for tests; ``O(n^3)``)."""
    strategy = materialize(c, n)
    strategy = strategy / torch.linalg.vector_norm(strategy, dim=0, keepdim=True)
    decoder = torch.linalg.solve_triangular(strategy, materialize(a, n), upper=False, left=False)
    return (decoder * decoder).sum() / n


def _start(b: int, momentum: float) -> torch.Tensor:
    """The band coefficients to start from: the workload's Toeplitz square root, cut to ``b``."""
    return prefix_sqrt(b, momentum)


def optimise_banded(b: int, n: int, a: torch.Tensor, start: torch.Tensor,
                    max_iter: int = MAX_ITER, restarts: int = RESTARTS) -> torch.Tensor:
    """Minimise ``banded_error`` over the ``b`` band coefficients with L-BFGS.

    ``c_0`` is held at 1 (the error does not depend on the scale); the other ``b - 1``
    coefficients are free. The objective is the log of the error (scale-free tolerances).
    L-BFGS restarts (a fresh curvature memory) while a run still improves the error by more
    than 1e-9 relative. Returns ``c / ||c||``.
    """
    if b == 1:
        return torch.ones(1, dtype=DTYPE)
    one = torch.ones(1, dtype=DTYPE)
    tail = (start[1:b] / start[0]).clone().requires_grad_(True)
    minimise(lambda: torch.log(banded_error(torch.cat([one, tail]), n, a)), tail,
             max_iter=max_iter, runs=restarts, tolerance_change=1e-14, improvement=1e-9)
    c = torch.cat([one, tail.detach()])
    return c / torch.linalg.vector_norm(c)


@functools.lru_cache(maxsize=64)
def optimal_banded(b: int, n: int, workload: str, momentum: float) -> tuple[float, ...]:
    """The optimised band coefficients for ``(b, n, workload, momentum)``, cached per process.

    Returns a tuple of ``b`` floats with ``c_0 > 0`` and ``||c||_2 = 1`` (a tuple, so that a
    cached value can never be changed by a caller).
    """
    with one_thread():
        a = workload_coefficients(workload, n, momentum)
        c = optimise_banded(b, n, a, _start(b, momentum))
    return tuple(float(v) for v in c)
