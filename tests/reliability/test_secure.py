"""Secure mode's noise (privgrad.privatize.secure): the float64 fast path agrees with the exact
256-bit definition, the release lies on the lattice, the generator cannot be seeded, and a
missing generator is a clear error. Row 13's distribution tests are in tests/privacy."""

from __future__ import annotations

import math
import sys

import mpmath
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.errors import ConfigError
from privgrad.privatize import secure
from privgrad.privatize.secure import (
    GRID_BITS,
    MARGIN,
    SecureGaussian,
    SecureRandom,
    lattice_offsets,
    lattice_spacing,
)


def _exact_z(hi: int, lo: int) -> mpmath.mpf:
    with mpmath.workprec(256):
        a = (mpmath.mpf(hi & (2**63 - 1)) + (mpmath.mpf(lo + 2**63) + 0.5) * mpmath.mpf(2) ** -64
             ) * mpmath.mpf(2) ** -64
        m = -mpmath.sqrt(2) * mpmath.erfinv(2 * a - 1)
        return -m if hi < 0 else m


def _stratified_words(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Words whose uniforms cover every scale from 1/2 down to 2**-120 (the tails too)."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(0, 63, n)  # hi's magnitude 2**(62 - shift): a near 2**-(2 + shift)
    hi = [int(rng.integers(0, 2**62)) >> int(s) for s in shift]
    hi = [h if rng.random() < 0.5 else h - 2**63 for h in hi]  # random sign bit
    lo = [int(x) for x in rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)]
    return torch.tensor(hi, dtype=torch.int64), torch.tensor(lo, dtype=torch.int64)


def test_ndtri_meets_the_error_bound_the_margin_assumes():
    """The documented assumption: float64 Z within 2**-45 of the exact Z (the margin allows
    2**-37), across every scale of the uniform, tails included."""
    hi, lo = _stratified_words(400, 0)
    a = torch.bitwise_and(hi, 2**63 - 1).to(torch.float64)
    a.add_(lo.to(torch.float64), alpha=2.0**-64).add_(0.5).mul_(2.0**-64)
    fast = torch.special.ndtri(a)
    worst = 0.0
    for h, w, z in zip(hi.tolist(), lo.tolist(), fast.tolist()):
        exact = _exact_z(h, w)
        exact = exact if h < 0 else -exact  # ndtri gives the lower-tail value
        worst = max(worst, abs(float(exact - z)))
    assert worst < 2.0**-45, worst


def test_fast_path_equals_the_exact_definition():
    hi, lo = _stratified_words(300, 1)
    f = torch.rand(300, dtype=torch.float64) - 0.5
    k = 1500.0
    j = lattice_offsets(f, k, hi, lo)
    exact = [secure._exact_offset(h, w, x, k) for h, w, x in zip(hi.tolist(), lo.tolist(), f.tolist())]
    assert j.tolist() == [float(e) for e in exact]


def test_values_near_a_rounding_boundary_take_the_exact_path(monkeypatch):
    """f chosen so that f + k Z falls within MARGIN / 4 of a half-integer: the float result is
    not trusted there, and the exact path decides, in both directions."""
    hi, lo = _stratified_words(40, 2)
    k = 1234.0
    z = torch.tensor([float(_exact_z(h, w)) for h, w in zip(hi.tolist(), lo.tolist())],
                     dtype=torch.float64)
    kz = k * z
    offset = torch.where(torch.arange(40) % 2 == 0, MARGIN / 4, -MARGIN / 4)
    f = (1.0 + offset - kz).remainder(1.0) - 0.5  # f = 1/2 + offset - kz (mod 1)
    calls = []
    original = secure._exact_offset
    monkeypatch.setattr(secure, "_exact_offset", lambda *a: calls.append(a) or original(*a))
    j = lattice_offsets(f, k, hi, lo)
    assert len(calls) >= 35  # float rounding of f may push a few just outside the margin
    exact = [original(h, w, x, k) for h, w, x in zip(hi.tolist(), lo.tolist(), f.tolist())]
    assert j.tolist() == [float(e) for e in exact]


@pytest.mark.parametrize("std", [1e-6, 0.37, 1.0, 3.0, 2.5e4])
def test_release_is_on_the_lattice_around_the_input(std):
    total = torch.randn(5000) * 10 * std
    out = SecureGaussian().add_noise(total, std)
    spacing = lattice_spacing(std)
    assert 2**GRID_BITS <= std / spacing < 2 ** (GRID_BITS + 1)
    assert math.frexp(spacing)[0] == 0.5  # a power of two
    units = out / spacing
    assert torch.equal(units, torch.round(units))
    noise = (out - total.double()) / std
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.05


def test_shape_dtype_device_and_edge_cases():
    g = SecureGaussian()
    total = torch.randn(3, 4, dtype=torch.float32)
    out = g.add_noise(total, 0.5)
    assert out.shape == (3, 4) and out.dtype == torch.float64 and out.device == total.device
    assert torch.equal(g.add_noise(total, 0.0), total.double())  # sigma = 0: nothing added
    assert g.add_noise(torch.zeros(0, 5), 1.0).shape == (0, 5)
    assert g.sample(total, 0.5).shape == (3, 4)


def test_generator_ignores_manual_seed_and_leaves_torch_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = SecureGaussian().add_noise(torch.zeros(1000), 1.0)
    assert torch.equal(torch.get_rng_state(), state), "secure noise consumed torch's generator"
    torch.manual_seed(0)
    b = SecureGaussian().add_noise(torch.zeros(1000), 1.0)
    assert not torch.equal(a, b)


def test_threaded_fill_writes_every_byte(monkeypatch):
    monkeypatch.setattr(secure, "_THREAD_BYTES", 1024)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    r = SecureRandom()
    buf = np.zeros(1 << 16 + 15, dtype=np.uint8)
    r.fill(buf, 1 << 16)
    counts = np.bincount(buf[:1 << 16], minlength=256)
    assert counts.min() > 150 and counts.max() < 380  # uniform bytes, no zero-filled slice
    assert not buf[1 << 16:].any()  # nothing written past n
    words = r.words(10_000)
    assert len(set(words.tolist())) == 10_000


def test_missing_cryptography_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers", None)
    with pytest.raises(ConfigError, match=r"secure_mode=True needs a cryptographically secure "
                                          r"generator.*pip install 'privgrad\[secure\]'"):
        PrivacyEngine(secure_mode=True)


def test_missing_os_entropy_is_a_clear_error(monkeypatch):
    def unavailable(n):
        raise NotImplementedError("no entropy source")

    monkeypatch.setattr(secure, "_os_entropy", unavailable)
    with pytest.raises(ConfigError, match="needs the operating system's entropy source.*"
                                          "secure_mode=False"):
        SecureGaussian()


def test_secure_engine_trains_and_accounts():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp", secure_mode=True)
    _, _, dl = engine.make_private(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,))),
                               batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    assert engine.noise.secure
    for x, y in dl:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert engine.steps == 5 and engine.get_epsilon(1e-5) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
