"""Secure mode's noise: a CSPRNG seeded by the operating system, and a Gaussian mechanism whose
floating-point output does not give the input away.

**The attack.** Adding a floating-point Gaussian sample to a floating-point sum releases a float
whose *set of possible values* depends on the sum: the sampler cannot produce every float, and
rounding the addition maps different inputs to different subsets (Mironov 2012 for the Laplace
mechanism; Jin et al. 2022, "Are We There Yet?", for the Gaussian mechanism and DP-SGD, with
success rates up to 92%). Jin et al. also show that exact *discrete* samplers based on rejection
leak the noise's magnitude through their running time. And a generator that is not
cryptographic (PyTorch's Mersenne Twister or Philox) can in principle be predicted.

**The method** (``SecureGaussian``), per coordinate of the clipped sum ``s`` with noise
``std = sigma * C``:

1. a lattice spacing ``L = 2**(floor(log2 std) - GRID_BITS)`` (a power of two, public), so
   ``k = std / L`` lies in ``[2**10, 2**11)``;
2. ``x = s / L`` split exactly into ``n + f`` (``n`` an integer, ``|f| <= 1/2``);
3. a uniform ``U`` with 116 bits of precision plus a sign bit, from AES-256 in counter mode keyed
   afresh for every call by ``os.urandom`` (pyca/cryptography over OpenSSL), and
   ``Z = Phi^{-1}(U)`` by inversion;
4. ``J = round(f + k Z)``, and the release ``L * (n + J)``.

``J`` is computed in float64 (``torch.special.ndtri``); where the float result lies within
``MARGIN`` (``2**-26`` lattice units) of a rounding boundary, that coordinate is recomputed with
256-bit arithmetic (mpmath) from the same exact ``U``. The float64 error is below ``2**-33``
lattice units (``ndtri`` within ``2**-45`` of the exact ``Z``, checked against mpmath by a test,
times ``k < 2**11``, plus two roundings), 128 times inside the margin, so every ``J`` equals
``round(f + k Phi^{-1}(U))`` computed exactly.

Privacy:
    *Exactness.* With exact arithmetic and a continuous ``U``, the release is
    ``L * round((s + std Z) / L)``: a deterministic function (post-processing) of the ordinary
    Gaussian mechanism ``s + N(0, std^2)``, so the accountant's epsilon applies unchanged, with no
    rounding slack in the sensitivity. The implementation differs from that only through the
    finite precision of ``U`` (``2**-117``): each lattice value's probability is off by at most
    ``2**-117`` and ``|Z|`` is capped near 12.5, a total-variation distance below ``2**-100`` per
    coordinate. Over ``D`` coordinates and ``T`` steps this adds at most ``D T 2**-100`` to delta
    (``1e-19`` for ten million parameters and ten thousand steps).

    *Floating point.* Every release is an integer multiple of ``L``, and every multiple within
    about 12 standard deviations of ``s`` is a possible output for every input, so the support
    no longer depends on the low bits of ``s`` (the attacks above need that). Dividing by the
    normaliser and casting to the parameter's dtype happen after the release (post-processing).

    *Timing.* Every coordinate costs the same fixed, vectorised work (16 random bytes, one
    ``ndtri``), unlike rejection samplers. The exact recomputation runs for about ``2**-25`` of
    the coordinates, and whether it runs depends on ``frac(f + k Z)``, whose distribution is
    uniform up to ``exp(-2 pi^2 k^2)`` whatever the data: its timing carries no information.

    *Assumptions and limits.* AES-256-CTR output is indistinguishable from random bytes (a
    computational assumption), and the OS entropy pool is sound. ``ndtri`` is accurate to
    ``2**-45`` in ``Z`` (a test checks this against mpmath). Branch-level timing inside library
    kernels (``ndtri``'s tail formula) is not constant time; it depends on how many of the
    ``D`` noise values fall in the tails, an aggregate that is independent of the data. The
    sensitivity of the *computed* clipped sum is taken to be ``C``; floating-point summation can
    exceed it by rounding (Casacuberta et al. 2022), which no noise sampler can fix. Other side
    channels (power, cache, GPU scheduling) are out of scope. Secure mode must never be combined
    with an operation that adds to the release before it leaves this module (see
    docs/reliability.md for data-parallel training).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from privgrad.errors import ConfigError

__all__ = ["GRID_BITS", "MARGIN", "SecureGaussian", "SecureRandom", "lattice_spacing"]

GRID_BITS = 10  # the lattice spacing is 2**-10 to 2**-11 of the noise std
MARGIN = 2.0 ** -26  # lattice units: closer float results to a boundary are recomputed exactly
_CHUNK_CPU = 1 << 15  # coordinates per thread and transform pass: temporaries stay in cache
_CHUNK_CUDA = 1 << 22  # on a GPU, fewer and larger kernels
_THREAD_BYTES = 1 << 23  # requests above this size fill the buffer from several threads
_PIECE = 1 << 20  # bytes per cipher call
_MASK63 = (1 << 63) - 1
_MASK53 = (1 << 53) - 1
_EXACT_BITS = 256  # working precision of the exact path (mpmath)
_FIX = ("Install it with pip install 'privgrad[secure]' (or pip install cryptography), or pass "
        "secure_mode=False (noise from PyTorch's generator, reproducible, not secure).")


def _os_entropy(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG (``getrandom`` on Linux)."""
    return os.urandom(n)


class SecureRandom:
    """Cryptographically secure random bytes: AES-256 in counter mode, keyed afresh from the
    operating system for every request (and every thread's slice of it).

    The cipher is pyca/cryptography's (OpenSSL, constant-time AES-NI or vector-permute code).
    Rekeying per request means a key never outlives one release: reading process memory later
    reveals nothing about earlier noise.

    Raises:
        ConfigError: ``cryptography`` is not installed, or the OS has no entropy source.
    """

    def __init__(self):
        try:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        except ImportError as e:
            raise ConfigError(
                "secure_mode=True needs a cryptographically secure generator (AES-256-CTR from "
                "the 'cryptography' package, keyed by os.urandom); got secure_mode=True without "
                f"'cryptography' installed. {_FIX}") from e
        try:
            _os_entropy(48)
        except NotImplementedError as e:
            raise ConfigError(
                "secure_mode=True needs the operating system's entropy source; got "
                f"os.urandom unavailable on this system ({e}). Run on a system with "
                "/dev/urandom or getrandom, or pass secure_mode=False.") from e
        self._cipher = lambda: Cipher(algorithms.AES(_os_entropy(32)), modes.CTR(_os_entropy(16)))
        self._zeros = np.zeros(_PIECE, dtype=np.uint8)
        self._pool: ThreadPoolExecutor | None = None

    def _fill_range(self, buf: np.ndarray, start: int, stop: int) -> None:
        """Keystream of one fresh key into ``buf[start:stop]`` (AES-CTR writes exactly as many
        bytes as it is given, but wants a block's slack after them: ``buf`` has it)."""
        encryptor = self._cipher().encryptor()
        for a in range(start, stop, _PIECE):
            m = min(_PIECE, stop - a)
            encryptor.update_into(self._zeros[:m], buf[a:a + m + 15])

    def fill(self, buf: np.ndarray, n: int) -> None:
        """Overwrite ``buf[:n]`` (``uint8``, at least ``n + 15`` long) with random bytes."""
        threads = min(torch.get_num_threads(), os.cpu_count() or 1, 8)
        if n < _THREAD_BYTES or threads < 2:
            self._fill_range(buf, 0, n)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=threads)
        bounds = np.linspace(0, n, threads + 1).astype(np.int64).tolist()
        list(self._pool.map(lambda ab: self._fill_range(buf, *ab), zip(bounds[:-1], bounds[1:])))

    def words(self, n: int, pin: bool = False) -> torch.Tensor:
        """``n`` uniform 64-bit words as a CPU ``int64`` tensor (pinned for a fast copy to a GPU
        when ``pin``)."""
        t = torch.empty(n + 2, dtype=torch.int64, pin_memory=pin)  # 16 bytes of slack
        self.fill(t.numpy().view(np.uint8), 8 * n)
        return t[:n]


def lattice_spacing(std: float) -> float:
    """``L = 2**(floor(log2 std) - GRID_BITS)``: the power of two with ``std / L`` in
    ``[2**GRID_BITS, 2**(GRID_BITS + 1))``."""
    _, e = math.frexp(std)  # std = m 2**e, m in [0.5, 1)
    return math.ldexp(1.0, e - 1 - GRID_BITS)


def _exact_offset(hi: int, lo: int, f: float, k: float) -> int:
    """``round(f + k Z)`` for one coordinate, with 256-bit arithmetic (mpmath): the reference
    that ``lattice_offsets()`` agrees with.

    The words define ``U`` exactly: bit 63 of ``hi`` is the sign of ``Z``, and
    ``a = (hi mod 2**63 + (lo + 2**63 + 1/2) 2**-64) 2**-64`` in ``(0, 1/2)`` its lower-tail
    probability, ``|Z| = -Phi^{-1}(a)``.
    """
    import mpmath

    with mpmath.workprec(_EXACT_BITS):
        two = mpmath.mpf(2)
        a = (mpmath.mpf(hi & _MASK63) + (mpmath.mpf(lo + 2**63) + mpmath.mpf(0.5)) * two**-64
             ) * two**-64
        magnitude = -mpmath.sqrt(2) * mpmath.erfinv(2 * a - 1)  # -Phi^{-1}(a) >= 0
        z = -magnitude if hi < 0 else magnitude
        return int(mpmath.floor(mpmath.mpf(f) + mpmath.mpf(k) * z + mpmath.mpf(0.5)))


def lattice_offsets(f: torch.Tensor, k: float, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """``J = round(f + k Z)`` (float64, integer-valued), ``Z`` drawn by inverting the uniform that
    the words ``hi, lo`` define (see ``_exact_offset()``, which this agrees with exactly).

    Args:
        f: ``(n,)`` float64 fractional parts, ``|f| <= 1/2``.
        k: noise std in lattice units, in ``[2**GRID_BITS, 2**(GRID_BITS + 1))``.
        hi, lo: ``(n,)`` int64 random words on ``f``'s device.
    """
    # a within a relative 2**-52 of its exact value (float64 keeps the tail's precision)
    a = torch.bitwise_and(hi, _MASK63).to(torch.float64)
    a.add_(lo.to(torch.float64), alpha=2.0**-64).add_(0.5).mul_(2.0**-64)
    kz = torch.special.ndtri(a).mul_(k)  # k Phi^{-1}(a) <= 0
    t = torch.where(hi < 0, kz, -kz).add_(f)  # f + k Z
    j = torch.round(t)
    near = t.sub_(j).abs_() > 0.5 - MARGIN  # within MARGIN of a rounding boundary
    if bool(near.any()):  # about 2**-25 of the coordinates, whatever the data
        idx = near.nonzero().flatten()
        exact = [_exact_offset(h, w, x, k)
                 for h, w, x in zip(hi[idx].tolist(), lo[idx].tolist(), f[idx].tolist())]
        j[idx] = torch.tensor(exact, dtype=torch.float64, device=j.device)
    return j


class SecureGaussian:
    """Secure mode's Gaussian noise (see the module docstring for the method and its limits).

    Not reproducible by design: ``torch.manual_seed`` has no influence, and this source never
    consumes PyTorch's generator.

    Raises:
        ConfigError: no secure generator is available (see ``SecureRandom``).
    """

    secure = True
    fuses_sums = False  # the sum must be snapped to the lattice with the noise (add_noise)

    def __init__(self, random: SecureRandom | None = None):
        self.random = random if random is not None else SecureRandom()

    def seeded(self, seed: int) -> SecureGaussian:
        """Itself: secure noise takes no seed (every draw comes from the operating system)."""
        return self

    def sample_many(self, likes: list, std: float) -> list[torch.Tensor]:
        """Not used (this source does not fuse sums: ``fuses_sums`` is false)."""
        raise NotImplementedError("SecureGaussian adds the noise to each sum (add_noise)")

    def state_dict(self) -> dict:
        """Nothing to resume: every draw comes fresh from the operating system."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run draws fresh noise (nothing to restore)."""

    def add_noise(self, total: torch.Tensor, std: float) -> torch.Tensor:
        """``L * round((total + N(0, std^2)) / L)`` as a new float64 tensor on ``total``'s device.

        Privacy:
            The release of the Gaussian mechanism on ``total`` (post-processed by the lattice
            rounding); ``total``'s sensitivity is the caller's to bound. Do not add anything to
            the result before releasing it: that would undo the floating-point hardening.
        """
        flat = total.detach().reshape(-1)
        out = torch.empty(flat.shape, dtype=torch.float64, device=flat.device)
        if std == 0 or flat.numel() == 0:
            return out.copy_(flat).reshape(total.shape)
        spacing = lattice_spacing(std)
        k = std / spacing  # exact: a power-of-two rescaling
        words = self.random.words(2 * flat.numel(), pin=flat.is_cuda)
        words = words.to(flat.device, non_blocking=True).view(2, -1)
        chunk = _CHUNK_CUDA if flat.is_cuda else _CHUNK_CPU * torch.get_num_threads()
        for a in range(0, flat.numel(), chunk):
            part = slice(a, a + chunk)
            x = flat[part].to(torch.float64).div_(spacing)  # exact
            n = torch.round(x)
            j = lattice_offsets(x.sub_(n), k, words[0, part], words[1, part])  # f = x - n exact
            torch.mul(n.add_(j), spacing, out=out[part])
        return out.reshape(total.shape)

    def standard_normal(self, like: torch.Tensor) -> torch.Tensor:
        """Independent ``N(0, 1)`` draws shaped like ``like`` (float64, on its device), from the
        CSPRNG: ``Z = Phi^{-1}(U)`` for the uniform ``U`` of two words, as ``lattice_offsets()``
        computes it (within ``2**-45`` of the exact inverse). For the correlated-noise
        mechanisms, whose noise is a linear combination of such draws
        (``privgrad.privatize.correlated``)."""
        n = like.numel()
        words = self.random.words(2 * n, pin=like.is_cuda).to(like.device).view(2, -1)
        a = torch.bitwise_and(words[0], _MASK63).to(torch.float64)
        a.add_(words[1].to(torch.float64), alpha=2.0**-64).add_(0.5).mul_(2.0**-64)
        z = torch.special.ndtri(a)  # Phi^{-1}(a) <= 0: the sign bit of the first word flips it
        return torch.where(words[0] < 0, z, -z).reshape(like.shape)

    def sample(self, like: torch.Tensor, std: float) -> torch.Tensor:
        """Noise alone: lattice values shaped like ``like`` (float64). Adding it to a float sum
        afterwards loses the floating-point hardening; the engine uses ``add_noise()``."""
        return self.add_noise(torch.zeros_like(like, dtype=torch.float64), std)
