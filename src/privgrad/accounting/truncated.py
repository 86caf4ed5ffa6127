"""Accounting of truncated Poisson sampling (``max_batch_size=M``): PLD and RDP.

Poisson sampling with rate ``q`` from ``N`` records, a sample larger than ``M`` cut to a
uniformly random ``M`` of its records. Conditioned on the differing record being sampled, the
other records' sample reaches ``M`` with probability ``t = P(Binomial(N - 1, q) >= M)``. Without
truncation the step is the ordinary Poisson-subsampled Gaussian mechanism (sensitivity 1); with
it, the differing record may take the place of another (a replace-one step of sensitivity 2,
noise ``sigma``, i.e. sensitivity 1 at ``sigma / 2``). The step is the mixture of the two with
weights ``1 - t`` and ``t`` (arXiv 2508.15089).

- **PLD**: ``dp_accounting``'s ``from_truncated_subsampled_gaussian_mechanism``, which builds
  exactly that mixture.
- **RDP**: given the other records' sample ``S``, if ``|S| < M`` the step is the ordinary
  add/remove one (RDP ``e1`` at ``q``, ``sigma``); if ``|S| >= M``, the record, sampled with
  probability ``q``, enters the batch with probability ``M / (|S| + 1)`` and then takes the
  place of a uniformly random other member ``y``: against the batch without it, the sum moves by
  ``z - y``, of norm at most ``2C``. That is a Poisson-subsampled Gaussian step of sensitivity 2
  with inclusion probability below ``q``: RDP ``e2`` at ``q``, ``sigma / 2``. As
  ``exp((alpha - 1) D_alpha)`` is jointly convex in the pair of distributions, the step's RDP is
  at most ``log((1 - t) exp((alpha - 1) e1) + t exp((alpha - 1) e2)) / (alpha - 1)``.
  ``dp_accounting``'s own RDP accountant does not take this event.

This module imports no torch, and SciPy and ``dp_accounting`` only when called.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["expected_dropped_share", "truncated_pld", "truncated_rdp", "truncation_probability"]


def truncation_probability(dataset_size: int, sample_rate: float, max_batch_size: int) -> float:
    """``t``: the chance that, with one record sampled, the other ``N - 1`` fill ``M`` or more."""
    from scipy import stats

    if max_batch_size >= dataset_size:
        return 0.0
    return float(stats.binom.sf(max_batch_size - 1, dataset_size - 1, sample_rate))


def expected_dropped_share(dataset_size: int, sample_rate: float, max_batch_size: int) -> float:
    """``E[(B - M)+] / E[B]`` for ``B ~ Binomial(N, q)``: the share of sampled records that
    truncation drops, on average (exact)."""
    from scipy import stats

    mean = dataset_size * sample_rate
    if max_batch_size >= dataset_size or mean == 0:
        return 0.0
    kept = float(stats.binom.sf(np.arange(max_batch_size), dataset_size, sample_rate).sum())
    return max(0.0, (mean - kept) / mean)  # E[min(B, M)] = sum_{j < M} P(B > j)


def truncated_rdp(noise_multiplier: float, sample_rate: float, dataset_size: int,
                  max_batch_size: int, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one truncated step at each order (see the module docstring; read-only).

    Privacy:
        An upper bound for add/remove-one neighbours, given the mixture decomposition above.
    """
    from privgrad.accounting.rdp import rdp_per_step

    return _truncated_rdp(float(noise_multiplier), float(sample_rate), int(dataset_size),
                          int(max_batch_size), tuple(float(a) for a in orders), rdp_per_step)


@lru_cache(maxsize=64)
def _truncated_rdp(sigma, q, n, m, orders, rdp_per_step) -> np.ndarray:
    from scipy import special

    plain = rdp_per_step(noise_multiplier=sigma, sample_rate=q, orders=orders)
    t = truncation_probability(n, q, m)
    if t == 0.0:
        return plain
    alphas = np.asarray(orders)
    doubled = rdp_per_step(noise_multiplier=sigma / 2, sample_rate=q, orders=orders)
    mixed = special.logsumexp(
        np.stack([(alphas - 1) * plain, (alphas - 1) * doubled]), axis=0,
        b=np.array([[1.0 - t], [t]])) / (alphas - 1)
    out = np.maximum(mixed, plain)  # (rounding only: the mixture is never below the plain step)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=64)
def truncated_pld(noise_multiplier: float, sample_rate: float, dataset_size: int,
                  max_batch_size: int, num_steps: int, interval: float):
    """The PLD of ``num_steps`` truncated steps (``dp_accounting``'s construction, pessimistic
    rounding), on the grid ``interval``."""
    from dp_accounting.pld import privacy_loss_distribution as dp_pld

    single = dp_pld.from_truncated_subsampled_gaussian_mechanism(
        dataset_size=dataset_size, sampling_probability=sample_rate,
        truncated_batch_size=max_batch_size, noise_multiplier=noise_multiplier,
        value_discretization_interval=interval)
    return single if num_steps == 1 else single.self_compose(num_steps)
