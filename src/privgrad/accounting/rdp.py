"""Rényi-DP accounting of DP-SGD (the moments accountant), on Google's ``dp_accounting``.

Integer orders and the RDP-to-(epsilon, delta) conversion come from ``dp_accounting``. Fractional
orders do not: ``dp_accounting`` 0.6.0 sums the absolute values of the alternating binomial series
of Mironov, Talwar and Zhang (2019, Sec. 3.3), which is loose (up to ~10% at sigma = 0.7) and
fails to converge (returns inf) for sigma <= 0.8 at orders below about 1.7. We evaluate that same
series with its signs (as TensorFlow Privacy and Opacus do), which converges; the tests check it
against high-precision numerical integration. Should it ever fail to converge we fall back to
``dp_accounting``'s pessimistic value, never to something smaller.

This module imports no torch, and ``dp_accounting`` and SciPy only when a curve is first
computed (they take a second or more to import; ``import privgrad`` must not pay that).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from privgrad.accounting.accountant import Accountant
from privgrad.accounting.events import TruncatedEntry
from privgrad.accounting.truncated import truncated_rdp

__all__ = ["RDPAccountant", "DEFAULT_ORDERS", "rdp_per_step"]

#: RDP orders: ``dp_accounting``'s ``DEFAULT_RDP_ORDERS`` (a superset of Opacus's), written out
#: so that importing this module does not import ``dp_accounting``; a test checks they agree.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]
)

_MAX_TERMS = 10_000
#: Smallest RDP value handed to dp_accounting's delta conversion (see ``_compute_delta``).
TINY_RDP = 1e-15


def _log_sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log(exp(a) - exp(b)) elementwise; nan where a < b, -inf where they are equal."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b == -np.inf, a, a + np.log1p(-np.exp(b - a)))


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha of the Poisson-subsampled Gaussian at fractional orders (signed series).

    Mironov, Talwar, Zhang (2019), "Rényi Differential Privacy of the Sampled Gaussian
    Mechanism", Sec. 3.3: A_alpha splits at z0 into two series in binomial(alpha, i), whose
    coefficients change sign for i > alpha. Each series is summed (with signs) up to the first
    term below exp(-30), as TensorFlow Privacy and Opacus do. Returns nan for an order whose
    series has not converged within ``_MAX_TERMS`` terms.
    """
    from scipy import special

    alphas = np.asarray(alphas, dtype=np.float64)[:, None]
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    terms = 64
    while True:
        i = np.arange(terms, dtype=np.float64)[None, :]
        coef = special.binom(alphas, i)
        with np.errstate(divide="ignore"):
            log_coef = np.log(np.abs(coef))
        j = alphas - i
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2.0) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2.0) * sigma))
        log_s0 = log_coef + i * log_q + j * log_1mq + (i * i - i) / (2.0 * sigma**2) + log_e0
        log_s1 = log_coef + j * log_q + i * log_1mq + (j * j - j) / (2.0 * sigma**2) + log_e1
        small = np.maximum(log_s0, log_s1) < -30
        done = small.any(axis=1)
        if done.all() or terms >= _MAX_TERMS:
            break
        terms *= 2
    last = np.where(done, small.argmax(axis=1), terms - 1)
    keep = np.arange(terms)[None, :] <= last[:, None]
    positive = (coef > 0) & keep
    negative = (coef < 0) & keep
    neg_inf = -np.inf

    def signed_sum(log_s: np.ndarray) -> np.ndarray:
        pos = special.logsumexp(np.where(positive, log_s, neg_inf), axis=1)
        neg = special.logsumexp(np.where(negative, log_s, neg_inf), axis=1)
        return _log_sub(pos, neg)

    out = np.logaddexp(signed_sum(log_s0), signed_sum(log_s1))
    return np.where(done, out, np.nan)


def _log_erfc(x: np.ndarray) -> np.ndarray:
    from scipy import special

    return math.log(2.0) + special.log_ndtr(-x * math.sqrt(2.0))


def _dp_accounting_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """Per-step RDP from ``dp_accounting``'s own accountant (public API)."""
    from dp_accounting import rdp as dp_rdp
    from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp_impl

    event = dp_rdp_impl.dp_event.GaussianDpEvent(sigma)
    if q < 1.0:
        event = dp_rdp_impl.dp_event.PoissonSampledDpEvent(q, event)
    accountant = dp_rdp.RdpAccountant(orders=list(orders))
    accountant.compose(event)
    return accountant.rdp


@contextmanager
def _quiet_absl():
    """Mute ``dp_accounting``'s log warnings for the fallback below: where its own series does
    not converge either it logs one line per order and excludes that order (RDP = inf, which
    is pessimistic and correct), which is noise on a user's console, not news."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@lru_cache(maxsize=256)
def _rdp_per_step_cached(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    integer = tuple(a for a in orders if float(a).is_integer())
    values = dict(zip(integer, _dp_accounting_rdp(q, sigma, integer))) if integer else {}
    fractional = [a for a in orders if a not in values]
    if fractional and q == 1.0:
        values.update((a, a / (2.0 * sigma**2)) for a in fractional)
    elif fractional:
        log_a = _log_a_fractional(q, sigma, np.array(fractional))
        for alpha, value in zip(fractional, log_a):
            if math.isnan(value) or value < 0:
                # Not converged (or round-off below zero): dp_accounting's value is pessimistic.
                with _quiet_absl():
                    (fallback,) = _dp_accounting_rdp(q, sigma, (alpha,))
                values[alpha] = max(float(fallback), 0.0)
            else:
                values[alpha] = float(value) / (alpha - 1.0)
    out = np.array([values[a] for a in orders], dtype=np.float64)
    out.setflags(write=False)
    return out


def rdp_per_step(*, noise_multiplier: float, sample_rate: float, orders: tuple[float, ...] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at each order (read-only array).

    Privacy:
        For ``noise_multiplier > 0``: an upper bound on the Rényi divergence of order alpha
        between the output distributions on add/remove-one neighbours, both directions.
    """
    if noise_multiplier == 0:
        return np.full(len(orders), np.inf)
    return _rdp_per_step_cached(float(sample_rate), float(noise_multiplier), tuple(float(a) for a in orders))


class RDPAccountant(Accountant):
    """Rényi-DP (moments) accountant: fast, incremental, a loose upper bound.

    Each step adds its RDP curve (cached per ``(noise_multiplier, sample_rate)``), so recording a
    step and asking for epsilon cost microseconds. The conversion to (epsilon, delta) is the
    improved bound of Balle et al. (2020, Prop. 12) as implemented by ``dp_accounting``.

    Privacy:
        An upper bound on epsilon. It overstates the true value of a DP-SGD run, typically by
        5-30% (see docs/accounting.md); prefer [`PLDAccountant`][privgrad.PLDAccountant] unless you
        need comparability with RDP numbers from other libraries. Accuracy depends on the set of
        orders; the optimum is searched over ``orders`` only.

    Args:
        orders: RDP orders (all > 1). Defaults to ``DEFAULT_ORDERS``.
    """

    name = "rdp"

    def __init__(self, orders: tuple[float, ...] = DEFAULT_ORDERS) -> None:
        super().__init__()
        orders = tuple(float(a) for a in orders)
        if not orders or min(orders) <= 1.0 or any(not math.isfinite(a) for a in orders):
            from privgrad._validate import fail

            raise fail("orders must be finite and > 1", "orders", orders, "Use the default orders.")
        self._orders = orders
        self._rdp = np.zeros(len(orders))

    @property
    def orders(self) -> tuple[float, ...]:
        """The RDP orders the optimum is taken over."""
        return self._orders

    @property
    def rdp(self) -> np.ndarray:
        """The accumulated RDP curve over [`orders`][privgrad.RDPAccountant.orders] (a copy)."""
        return self._rdp.copy()

    def _append(self, entry) -> None:
        if entry.num_steps > 0 and entry.noise_multiplier > 0:
            if isinstance(entry, TruncatedEntry):  # max_batch_size (privgrad.accounting.truncated)
                curve = truncated_rdp(entry.noise_multiplier, entry.sample_rate, entry.dataset_size,
                                      entry.max_batch_size, self._orders)
            else:
                curve = rdp_per_step(
                    noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate,
                    orders=self._orders)
            self._rdp = self._rdp + entry.num_steps * curve
        super()._append(entry)

    def load_state_dict(self, state_dict) -> None:
        """See
        [`Accountant.load_state_dict()`][privgrad.accounting.accountant.Accountant.load_state_dict]."""
        saved = self._rdp
        self._rdp = np.zeros(len(self._orders))
        try:
            super().load_state_dict(state_dict)
        except Exception:
            self._rdp = saved
            raise

    def _compute_epsilon(self, delta: float) -> float:
        from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp_impl

        return float(dp_rdp_impl.compute_epsilon(self._orders, self._rdp, delta)[0])

    def _compute_delta(self, epsilon: float) -> float:
        from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp_impl

        # dp_accounting takes log1p(-exp(-rdp)), which fails (math domain error) once rdp is
        # so small that exp(-rdp) rounds to 1 (huge noise, tiny sample rate). Raising such an
        # order's divergence to TINY_RDP only raises delta: the answer stays an upper bound.
        rdp = np.where((self._rdp > 0) & (self._rdp < TINY_RDP), TINY_RDP, self._rdp)
        return float(dp_rdp_impl.compute_delta(self._orders, rdp, epsilon)[0])
