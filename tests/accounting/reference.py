"""An independent epsilon for Poisson-subsampled Gaussian DP-SGD, for tests only.

It shares no code with ``dp_accounting`` (or privgrad): it builds the privacy loss distribution
of one step from the exact CDF of the loss on a fine grid, splits every bucket's mass between its
two end points so that the bucket's mean is kept (second-order accurate, not a bound), composes
``steps`` copies by one FFT, and reads epsilon off the hockey-stick divergence in closed form
between grid points. Both neighbour directions (remove and add one record) are computed; epsilon
is the larger. For ``sample_rate == 1`` it is checked against the exact Gaussian formula.

Loss of the "remove" pair P = (1-q) N(0, s^2) + q N(1, s^2) against Q = N(0, s^2), for x ~ P:
L(x) = log(1 - q + q exp((2x - 1) / (2 s^2))), increasing in x. The "add" pair swaps P and Q:
L'(x) = -L(x) for x ~ N(0, s^2).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, signal, special

TAIL_SD = 14.0  # noise is cut at 14 standard deviations (mass ~1e-44, ignored)


def _x_of_loss(loss, q, sigma):
    """x with L(x) = loss, for the remove pair; -inf below the loss's infimum log(1 - q)."""
    loss = np.asarray(loss, dtype=np.float64)
    inner = np.expm1(loss) + q  # e^loss - (1 - q)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = sigma**2 * (np.log(inner) - math.log(q)) + 0.5
    return np.where(inner > 0, x, -np.inf)


def _survival(loss, q, sigma, direction):
    """P(L > loss) under the pair's first distribution."""
    if direction == "remove":
        x = _x_of_loss(loss, q, sigma)
        return (1 - q) * special.ndtr(-x / sigma) + q * special.ndtr(-(x - 1) / sigma)
    # add: L' = -L(x) > loss  <=>  L(x) < -loss  <=>  x < x(-loss), x ~ N(0, s^2)
    x = _x_of_loss(-np.asarray(loss, dtype=np.float64), q, sigma)
    return special.ndtr(x / sigma)


def _loss(x, q, sigma):
    return np.logaddexp(math.log1p(-q) if q < 1 else -np.inf, math.log(q) + (2 * x - 1) / (2 * sigma**2))


def single_step_pmf(q, sigma, h, direction):
    """Mean-preserving pmf of one step's loss on the grid h * (i0 + arange(K))."""
    if direction == "remove":
        lo, hi = _loss(-TAIL_SD * sigma, q, sigma), _loss(1 + TAIL_SD * sigma, q, sigma)
    else:
        lo, hi = -_loss(TAIL_SD * sigma, q, sigma), -_loss(-TAIL_SD * sigma, q, sigma)
    i0, i1 = math.floor(lo / h) - 1, math.ceil(hi / h) + 1
    edges = h * np.arange(i0, i1 + 1, dtype=np.float64)
    s_edge = _survival(edges, q, sigma, direction)
    s_mid = _survival(edges[:-1] + h / 2, q, sigma, direction)
    avg = (s_edge[:-1] + 4 * s_mid + s_edge[1:]) / 6  # Simpson: mean of S over each bucket
    to_left = np.clip(s_edge[:-1] - avg, 0, None)  # mass of bucket (a, b] kept at a
    to_right = np.clip(avg - s_edge[1:], 0, None)  # ... and at b; together they keep its mean
    pmf = np.zeros(len(edges))
    pmf[:-1] += to_left
    pmf[1:] += to_right
    return i0, pmf


def compose(parts):
    """pmf of the sum of ``n`` copies of each ``(i0, pmf, n)`` in ``parts``, on a window wide
    enough to hold all its mass (40 standard deviations and two single-step widths each side)."""
    mean = var = 0.0
    offset = span = width = 0
    for i0, pmf, n in parts:
        grid = np.arange(len(pmf), dtype=np.float64)
        total = pmf.sum()
        m = (grid * pmf).sum() / total
        mean += n * m
        var += n * ((grid - m) ** 2 * pmf).sum() / total
        offset += n * i0
        span += n * (len(pmf) - 1)
        width = max(width, len(pmf))
    lo = max(0, math.floor(mean - 40 * math.sqrt(var) - 2 * width))
    hi = min(span, math.ceil(mean + 40 * math.sqrt(var) + 2 * width))
    size = int(2 ** math.ceil(math.log2(hi - lo + 1)))
    spectrum = np.ones(size // 2 + 1, dtype=np.complex128)
    for _, pmf, n in parts:
        spectrum *= np.fft.rfft(pmf, size) ** n
    wrapped = np.fft.irfft(spectrum, size)
    offsets = lo + (np.arange(size) - lo) % size  # unwrap the circular index into [lo, lo + size)
    order = np.argsort(offsets)
    return offset + offsets[order], np.clip(wrapped[order], 0, None)


def epsilon_from_pmf(index, probs, h, delta):
    """Smallest epsilon with sum_s p(s) (1 - exp(epsilon - s))_+ <= delta."""
    # above[k] = P(S > s_k); tilt[k] = sum_{j>k} p_j exp(s_k - s_j)  (by a backwards recursion)
    above = np.concatenate([np.cumsum(probs[::-1])[::-1][1:], [0.0]])
    decay = math.exp(-h)  # tilt[k] = decay * (tilt[k + 1] + probs[k + 1]), a first-order filter
    tilt = signal.lfilter([0.0, decay], [1.0, -decay], probs[::-1])[::-1]
    gap = above - tilt  # delta at epsilon = s_k
    ok = np.nonzero(gap <= delta)[0]
    k = ok[0]
    if k == 0:
        return index[0] * h
    k -= 1  # epsilon lies in [s_k, s_{k+1}): delta(eps) = above[k] - exp(eps - s_k) tilt[k]
    return index[k] * h + math.log((above[k] - delta) / tilt[k])


def _scale(q, sigma):
    return min(1 / sigma, q * math.sqrt(math.expm1(min(1 / sigma**2, 700))))


def reference_epsilon(runs, *, delta, points_per_sd=100):
    """Epsilon of the runs ``[(noise_multiplier, sample_rate, steps), ...]`` composed in order.

    Second-order accurate: the grid is ``points_per_sd`` times finer than the smallest
    single-step loss scale; doubling it changes epsilon by ~1e-6 relative.
    """
    runs = [(float(s), float(q), int(n)) for s, q, n in runs if n > 0]
    h = min(_scale(q, s) for s, q, _ in runs) / points_per_sd
    eps = []
    for direction in ("remove", "add"):
        if direction == "add" and all(q == 1 for _, q, _ in runs):
            continue  # symmetric without subsampling
        parts = [(*single_step_pmf(q, s, h, direction), n) for s, q, n in runs]
        index, probs = compose(parts)
        eps.append(epsilon_from_pmf(index, probs, h, delta))
    return max(0.0, max(eps))


def gaussian_epsilon(*, noise_multiplier, steps, delta):
    """Exact epsilon of ``steps`` Gaussian mechanisms without subsampling (Balle & Wang 2018)."""
    mu = math.sqrt(steps) / noise_multiplier

    def excess(eps):
        return special.ndtr(-eps / mu + mu / 2) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2)) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return optimize.brentq(excess, 0.0, hi, xtol=1e-14, rtol=1e-14)
