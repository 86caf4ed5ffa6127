"""Lower-triangular Toeplitz matrices as truncated power series, in torch float64.

An ``n x n`` lower-triangular Toeplitz matrix ``T`` is fixed by its first column
``t = (t_0, ..., t_{n-1})``: ``T[i, j] = t_{i-j}`` for ``i >= j``, else 0. Writing
``t(x) = t_0 + t_1 x + ... + t_{n-1} x^{n-1}``, the product of two such matrices is the matrix of
the product series ``s(x) t(x) mod x^n``, and the inverse of ``T`` (when ``t_0 != 0``) is the
matrix of the series ``1 / t(x) mod x^n``. So these matrices commute, and everything the
mechanisms need (the workload ``A``, the strategy ``C``, the noise matrix ``C^{-1}`` and the
decoder ``B = A C^{-1}``) is computed on ``n`` coefficients instead of ``n^2`` entries:
products by FFT in ``O(n log n)``, inverses by Newton's iteration ``g <- g (2 - t g)``, which
doubles the number of correct coefficients each round (``O(n log n)`` in all).

Everything here is differentiable with ``torch.autograd`` (the optimisers use it). This module
imports nothing from privgrad.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "WORKLOADS",
    "column_norms",
    "materialize",
    "mean_row_energy",
    "min_sep_sensitivity_squared",
    "minimise",
    "one_thread",
    "prefix_sqrt",
    "series_inverse",
    "series_mul",
    "workload_coefficients",
]

DTYPE = torch.float64

#: The workloads a strategy can be optimised for (see ``workload_coefficients``).
WORKLOADS = ("prefix_sum", "momentum")

# below this length, a direct convolution beats the FFT and is exact to the last bit
_DIRECT_MAX = 64


def series_mul(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` coefficients of ``a(x) b(x)``: the first column of the product of the two
    lower-triangular Toeplitz matrices (missing coefficients are zeros)."""
    a, b = a[:n], b[:n]
    size = a.numel() + b.numel() - 1
    if min(a.numel(), b.numel()) <= _DIRECT_MAX or size <= 4 * _DIRECT_MAX:
        short, long = (a, b) if a.numel() <= b.numel() else (b, a)
        # conv1d correlates; flipping the short kernel makes it a convolution
        out = torch.nn.functional.conv1d(long.view(1, 1, -1), short.flip(0).view(1, 1, -1),
                                         padding=short.numel() - 1).view(-1)
    else:
        fft_size = 1 << (size - 1).bit_length()
        out = torch.fft.irfft(torch.fft.rfft(a, fft_size) * torch.fft.rfft(b, fft_size), fft_size)
    out = out[:n]
    if out.numel() < n:
        out = torch.cat([out, out.new_zeros(n - out.numel())])
    return out


def series_inverse(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` coefficients of ``1 / t(x)``: the first column of ``T^{-1}``.

    Newton's iteration ``g <- g (2 - t g) mod x^{2m}`` doubles the number of exact coefficients
    each round: ``ceil(log2 n)`` rounds of two FFT products.
    """
    if t.numel() == 0 or float(t[0].detach()) == 0.0:
        raise ZeroDivisionError("a lower-triangular Toeplitz matrix with t_0 = 0 is singular")
    g = (1.0 / t[:1]).reshape(1)
    m = 1
    while m < n:
        m = min(2 * m, n)
        two = torch.zeros(m, dtype=g.dtype)
        two[0] = 2.0
        g = series_mul(g, two - series_mul(t, g, m), m)
    return g[:n]


def workload_coefficients(workload: str, n: int, momentum: float = 0.0) -> torch.Tensor:
    """The first column ``a`` of the workload matrix ``A`` (lower-triangular Toeplitz).

    ``"prefix_sum"``: ``a_k = 1``; ``A`` is the lower-triangular matrix of ones, and ``(A g)_t``
    is the sum of the first ``t + 1`` gradients: the iterate of SGD with learning rate 1.

    ``"momentum"``: SGD with heavy-ball momentum ``beta`` and learning rate 1,
    ``m_t = beta m_{t-1} + g_t``, ``theta_t = theta_{t-1} - m_t``, so that
    ``theta_t - theta_{-1} = -sum_{j<=t} A[t, j] g_j`` with
    ``A[t, j] = sum_{i=j}^{t} beta^(i-j) = (1 - beta^(t-j+1)) / (1 - beta)``, i.e.
    ``a_k = (1 - beta^(k+1)) / (1 - beta)`` and ``a(x) = 1 / ((1 - x)(1 - beta x))``.
    ``momentum=0`` gives the prefix sum.
    """
    k = torch.arange(n, dtype=DTYPE)
    if workload == "prefix_sum" or momentum == 0.0:
        return torch.ones(n, dtype=DTYPE)
    beta = torch.tensor(momentum, dtype=DTYPE)
    return (1.0 - beta ** (k + 1)) / (1.0 - beta)


def prefix_sqrt(n: int, momentum: float = 0.0) -> torch.Tensor:
    """The first ``n`` coefficients of the square root of the workload series.

    For the prefix sum, ``(1 - x)^{-1/2}``: ``binom(2k, k) / 4^k`` (Fichtenberger et al. 2023;
    the Toeplitz square root ``C = A^{1/2}`` factors ``A = C C``). For momentum ``beta`` the
    workload series is ``(1 - x)^{-1} (1 - beta x)^{-1}``, whose square root is the product of
    the two half powers. Used to start the optimisers.
    """
    k = torch.arange(1, n, dtype=DTYPE)
    half = torch.cat([torch.ones(1, dtype=DTYPE), torch.cumprod((2 * k - 1) / (2 * k), 0)])
    if momentum == 0.0:
        return half
    return series_mul(half, half * momentum ** torch.arange(n, dtype=DTYPE), n)


def column_norms(c: torch.Tensor, n: int) -> torch.Tensor:
    """The L2 norm of each of the ``n`` columns of the ``n x n`` lower-triangular Toeplitz matrix
    with first column ``c`` (zero-padded): column ``j`` holds ``c_0, ..., c_{n-1-j}``."""
    c = c[:n]
    squares = torch.cumsum(c * c, 0)
    if squares.numel() < n:
        squares = torch.cat([squares, squares[-1:].expand(n - squares.numel())])
    return squares.flip(0).sqrt()


def materialize(c: torch.Tensor, n: int) -> torch.Tensor:
    """The dense ``n x n`` lower-triangular Toeplitz matrix with first column ``c`` (for tests
    and small ``n``)."""
    col = torch.zeros(n, dtype=c.dtype)
    m = min(n, c.numel())
    col[:m] = c[:m]
    i = torch.arange(n)
    lag = i.view(-1, 1) - i.view(1, -1)
    return torch.where(lag >= 0, col[lag.clamp(min=0)], torch.zeros((), dtype=c.dtype))


def mean_row_energy(h: torch.Tensor, rows: int) -> torch.Tensor:
    """``sum_{t < rows} ||row t of H||^2`` for the lower-triangular Toeplitz ``H`` with first
    column ``h``: row ``t`` holds ``h_0, ..., h_t``, so coefficient ``k`` appears in
    ``rows - k`` rows."""
    h = h[:rows]
    weights = rows - torch.arange(h.numel(), dtype=h.dtype)
    return (weights * h * h).sum()


def min_sep_sensitivity_squared(c: torch.Tensor, n: int, min_sep: int | None) -> torch.Tensor:
    """The squared L2 sensitivity of the ``n x n`` lower-triangular Toeplitz ``C`` (first
    column ``c``) when a record takes part at most once every ``min_sep`` steps (``None``: at
    most once in all), for contributions of norm at most 1 (vectors as well as scalars).

    ``None``: the norm of the first (longest) column, exact for any ``c``. Otherwise the value
    is ``||C' u||^2`` for ``u`` the indicator of steps ``0, min_sep, 2 min_sep, ...`` and ``C'``
    the Toeplitz matrix of the smallest nonincreasing sequence above ``|c|``: exact when ``c``
    is nonnegative and nonincreasing (then ``C' = C``; Kalinin and Lampert 2024, "Banded square
    root matrix factorization", Theorem 2; the tests check it by brute force), an upper bound
    otherwise (``|C^T C| <= C'^T C'`` entrywise, and all-equal contributions are worst for
    ``C'``).
    """
    c = c[:n]
    if min_sep is None or min_sep >= n:
        return (c * c).sum()
    c = torch.flip(torch.cummax(torch.flip(c.abs(), (0,)), 0).values, (0,))
    comb = torch.zeros(n, dtype=c.dtype)
    comb[::min_sep] = 1.0
    v = series_mul(c, comb, n)
    return (v * v).sum()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, then restore the setting.

    The optimisers work on vectors of ``n`` numbers, too small for threads to pay off (on a
    busy 2-core machine, two threads made each elementwise operation 50 times slower while
    they waited for each other). One thread also makes the optimised strategy the same on
    every machine, whatever its number of cores.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def minimise(objective: Callable[[], torch.Tensor], param: torch.Tensor, *, max_iter: int,
             runs: int, tolerance_change: float, improvement: float = 0.0) -> float:
    """Minimise ``objective()`` over the leaf tensor ``param`` (in place) with L-BFGS and a
    strong-Wolfe line search; a fresh curvature memory each run, at most ``runs`` runs, stopping
    once a run improves the objective by ``improvement`` or less. Returns the final value."""

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = objective()
        value.backward()
        return value

    with torch.no_grad():
        best = float(objective())
    for _ in range(runs):
        optimiser = torch.optim.LBFGS([param], lr=1.0, max_iter=max_iter, history_size=20,
                                      tolerance_grad=1e-12, tolerance_change=tolerance_change,
                                      line_search_fn="strong_wolfe")
        optimiser.step(closure)
        with torch.no_grad():
            value = float(objective())
        gained, best = best - value, min(best, value)
        if not math.isfinite(value) or gained <= improvement:
            break
    return best
