"""The Toeplitz algebra against dense matrices, and the min-separation sensitivity formula
against brute force over every participation pattern."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from privgrad.mechanisms.toeplitz import (
    column_norms,
    materialize,
    mean_row_energy,
    min_sep_sensitivity_squared,
    prefix_sqrt,
    series_inverse,
    series_mul,
    workload_coefficients,
)
from tests.mechanisms.reference import (
    brute_force_sensitivity,
    min_sep_patterns,
    momentum_workload,
    ones_lower,
)

D = torch.float64


def random_coefficients(seed: int, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(m, generator=g, dtype=D) - 0.3
    c[0] = 1.0 + torch.rand(1, generator=g, dtype=D)
    return c


@given(n=st.integers(1, 300), m=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 99))
def test_series_mul_is_the_product_of_the_toeplitz_matrices(n, m, k, seed):
    a, b = random_coefficients(seed, m), random_coefficients(seed + 1, k)
    dense = materialize(a, n) @ materialize(b, n)
    torch.testing.assert_close(series_mul(a, b, n), dense[:, 0], rtol=0, atol=1e-12)


@given(n=st.integers(1, 400), m=st.integers(1, 40), seed=st.integers(0, 99))
def test_series_inverse_is_the_inverse_matrix(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(m, generator=g, dtype=D) / m  # |c_1| + ... < c_0: a stable inverse
    c[0] = 1.0
    inverse = torch.linalg.solve_triangular(materialize(c, n), torch.eye(n, dtype=D), upper=False)
    torch.testing.assert_close(series_inverse(c, n), inverse[:, 0], rtol=0, atol=1e-12)


def test_workloads_match_their_definitions():
    n = 12
    torch.testing.assert_close(materialize(workload_coefficients("prefix_sum", n), n), ones_lower(n))
    torch.testing.assert_close(materialize(workload_coefficients("momentum", n, 0.9), n),
                               momentum_workload(n, 0.9))
    assert torch.equal(workload_coefficients("momentum", n, 0.0), torch.ones(n, dtype=D))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_prefix_sqrt_squares_to_the_workload(momentum):
    n = 50
    root = prefix_sqrt(n, momentum)
    torch.testing.assert_close(series_mul(root, root, n),
                               workload_coefficients("momentum", n, momentum), rtol=1e-12, atol=1e-12)


def test_column_norms_and_row_energy():
    c, n = torch.tensor([0.8, -0.5, 0.3, 0.0, 0.0, 0.0, 0.0], dtype=D), 7
    dense = materialize(c, n)
    torch.testing.assert_close(column_norms(c[:3], n), torch.linalg.vector_norm(dense, dim=0))
    for rows in (1, 4, 7):
        torch.testing.assert_close(mean_row_energy(c, rows), (dense[:rows] ** 2).sum())


@pytest.mark.parametrize("n,min_sep", [(6, 1), (7, 2), (8, 3), (9, 4), (8, 8), (8, None)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_sep_sensitivity_is_exact_for_nonincreasing_nonnegative_coefficients(n, min_sep, seed):
    """Theorem 2 of Kalinin and Lampert 2024, checked by brute force over every pattern."""
    g = torch.Generator().manual_seed(seed)
    c = torch.sort(torch.rand(n, generator=g, dtype=D), descending=True).values
    dense = materialize(c, n)
    sep = n if min_sep is None else min_sep
    brute = brute_force_sensitivity(dense, min_sep_patterns(n, sep))
    assert float(min_sep_sensitivity_squared(c, n, min_sep).sqrt()) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_min_sep_sensitivity_bounds_any_coefficients(seed):
    """Signed or growing coefficients: the projection onto a nonincreasing majorant of |c|
    gives an upper bound (the plain formula would not: c = (1, -0.9) under min_sep = 1)."""
    n, g = 7, torch.Generator().manual_seed(seed)
    c = torch.randn(n, generator=g, dtype=D)
    for min_sep in (1, 2, 3):
        brute = brute_force_sensitivity(materialize(c, n), min_sep_patterns(n, min_sep))
        assert float(min_sep_sensitivity_squared(c, n, min_sep).sqrt()) >= brute * (1 - 1e-12)
    c = torch.tensor([1.0, -0.9, 0.0, 0.0], dtype=D)
    brute = brute_force_sensitivity(materialize(c, 4), min_sep_patterns(4, 1))
    assert float(min_sep_sensitivity_squared(c, 4, 1).sqrt()) >= brute
