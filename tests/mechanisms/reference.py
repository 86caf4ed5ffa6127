"""Independent references for the mechanisms' tests: dense generic optimisation, brute force.

Nothing here uses privgrad.mechanisms' Toeplitz algebra: matrices are formed densely (``O(n^2)``
entries) and solved with ``torch.linalg``.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

DTYPE = torch.float64


@contextlib.contextmanager
def one_thread():
    """Small dense problems run faster on one thread (and do not fight a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ones_lower(n: int) -> torch.Tensor:
    """The prefix-sum workload, densely."""
    return torch.tril(torch.ones(n, n, dtype=DTYPE))


def momentum_workload(n: int, beta: float) -> torch.Tensor:
    """SGD with momentum, densely: ``A[t, j] = sum_{i=j..t} beta^(t-i)`` by a direct loop."""
    out = torch.zeros(n, n, dtype=DTYPE)
    for t in range(n):
        for j in range(t + 1):
            out[t, j] = sum(beta ** (t - i) for i in range(j, t + 1))
    return out


def dense_error(strategy: torch.Tensor, workload: torch.Tensor) -> torch.Tensor:
    """``||A C^{-1}||_F^2 / n`` for a lower-triangular ``C`` whose columns have norm <= 1."""
    decoder = torch.linalg.solve_triangular(strategy, workload, upper=False, left=False)
    return (decoder * decoder).sum() / workload.shape[0]


def band_mask(n: int, bands: int) -> torch.Tensor:
    """True on the lower-triangular band of width ``bands`` (diagonal included)."""
    i = torch.arange(n)
    lag = i.view(-1, 1) - i.view(1, -1)
    return (lag >= 0) & (lag < bands)


def optimise_general_banded(workload: torch.Tensor, bands: int, start: torch.Tensor | None = None,
                            iterations: int = 3000) -> tuple[float, torch.Tensor]:
    """The best *general* (not Toeplitz) ``bands``-banded lower-triangular ``C`` with every
    column normalised to norm 1, by L-BFGS over all its free entries (the problem of
    Choquette-Choo et al. 2023, solved densely). Returns (error, C)."""
    n = workload.shape[0]
    mask = band_mask(n, bands)
    init = torch.eye(n, dtype=DTYPE) if start is None else start.clone()
    free = init[mask].clone().requires_grad_(True)

    def build() -> torch.Tensor:
        raw = torch.zeros(n, n, dtype=DTYPE).masked_scatter(mask, free)
        return raw / torch.linalg.vector_norm(raw, dim=0, keepdim=True)

    opt = torch.optim.LBFGS([free], lr=1.0, max_iter=iterations, history_size=50,
                            tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = torch.log(dense_error(build(), workload))
        value.backward()
        return value

    with one_thread():
        for _ in range(3):
            opt.step(closure)
    with torch.no_grad():
        strategy = build()
        return float(dense_error(strategy, workload)), strategy


def brute_force_sensitivity(strategy: torch.Tensor, patterns) -> float:
    """``max ||C u||`` over participation patterns ``P`` and ``u`` with ``u_j in {-1, +1}`` on
    ``P`` and 0 elsewhere: the sensitivity of ``C x`` for scalar contributions ``|x_j| <= 1``
    (a convex function is largest at a vertex of the box)."""
    n = strategy.shape[0]
    best = 0.0
    for pattern in patterns:
        pattern = list(pattern)
        for signs in itertools.product((-1.0, 1.0), repeat=len(pattern)):
            u = torch.zeros(n, dtype=DTYPE)
            u[pattern] = torch.tensor(signs, dtype=DTYPE)
            best = max(best, float(torch.linalg.vector_norm(strategy @ u)))
    return best


def min_sep_patterns(n: int, min_sep: int, max_participations: int | None = None):
    """Every non-empty set of steps in ``range(n)`` whose elements are at least ``min_sep``
    apart (and at most ``max_participations`` of them)."""
    cap = n if max_participations is None else max_participations

    def grow(prefix, nxt):
        if prefix:
            yield tuple(prefix)
        if len(prefix) == cap:
            return
        for s in range(nxt, n):
            yield from grow(prefix + [s], s + min_sep)

    yield from grow([], 0)


def optimise_toeplitz_single_participation(workload: torch.Tensor, bands: int,
                                           iterations: int = 3000) -> torch.Tensor:
    """The banded Toeplitz ``c`` minimising ``||A T^{-1}||_F^2 ||c||^2`` (no column
    normalisation in the objective), densely: the objective of McKenna 2024."""
    n = workload.shape[0]
    i = torch.arange(n)
    lag = i.view(-1, 1) - i.view(1, -1)
    inside = (lag >= 0) & (lag < bands)
    free = torch.ones(bands, dtype=DTYPE)
    free[1:] = 0.3
    free.requires_grad_(True)

    def loss() -> torch.Tensor:
        strategy = torch.where(inside, free[lag.clamp(0, bands - 1)], torch.zeros((), dtype=DTYPE))
        decoder = torch.linalg.solve_triangular(strategy, workload, upper=False, left=False)
        return torch.log((decoder * decoder).sum() * (free * free).sum())

    opt = torch.optim.LBFGS([free], lr=1.0, max_iter=iterations, history_size=50,
                            tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    with one_thread():
        for _ in range(3):
            opt.step(closure)
    return free.detach()
