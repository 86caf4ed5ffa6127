"""The streaming noise: its covariance is C^{-1} C^{-T} (a statistical test, shown to fail on
mutants), b = 1 passes the draws through bit for bit, and a save/load mid-stream continues bit
for bit."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from privgrad.errors import CheckpointError, ConfigError, PrivacyStateError
from privgrad.mechanisms import BLT, DPSGD, BandedNoise, BandMF, BufferedNoise

D = torch.float64
ALPHA = 1e-3
COORDINATES = 200_000  # each coordinate is an independent draw of the whole n-step sequence


def sequence(noise, n: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([noise.step(torch.randn(like.shape, generator=g, dtype=like.dtype))
                        for _ in range(n)])


def covariance_p_value(samples: torch.Tensor, expected: torch.Tensor) -> float:
    """Smallest Bonferroni-corrected two-sided p-value over the entries of the empirical
    covariance (n x m samples, mean 0 known), each entry's variance
    ``(S_ii S_jj + S_ij^2) / m`` under normality."""
    n, m = samples.shape
    empirical = samples @ samples.T / m
    var = (torch.outer(expected.diagonal(), expected.diagonal()) + expected ** 2) / m
    z = ((empirical - expected) / var.sqrt()).abs()
    rows, cols = torch.triu_indices(n, n)
    worst = float(z[rows, cols].max())
    return min(1.0, 2 * stats.norm.sf(worst) * rows.numel())


def expected_covariance(strategy: torch.Tensor) -> torch.Tensor:
    inverse = torch.linalg.inv(strategy)
    return inverse @ inverse.T


MECHANISMS = [BandMF(num_bands=3), BandMF(num_bands=4, workload="momentum"), BandMF(num_bands=8),
              BLT(num_buffers=2), BLT(num_buffers=3, min_sep=4)]


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=repr)
def test_covariance_is_the_inverse_strategy_squared(mechanism):
    n = 8
    like = torch.zeros(COORDINATES, dtype=D)
    samples = sequence(mechanism.noise(n, like), n, seed=1, like=like)
    assert covariance_p_value(samples, expected_covariance(mechanism.matrix(n))) > ALPHA


@pytest.mark.parametrize("mutant", ["not column-normalised", "one coefficient 5% off",
                                    "BLT output scales 5% off", "BLT scale 5% off",
                                    "noise times 1.05"])
def test_the_covariance_test_catches_mutants(mutant):
    n = 8
    like = torch.zeros(COORDINATES, dtype=D)
    if mutant == "not column-normalised":  # the column scaling of the last b - 1 steps dropped
        mech = BandMF(num_bands=4)
        noise = mech.noise(n, like)
        noise._norms_last = [noise._norm_full] * len(noise._norms_last)
    elif mutant == "one coefficient 5% off":
        mech = BandMF(num_bands=4)
        c = mech.coefficients(n).clone()
        c[1] *= 1.05
        noise = BandedNoise(c, n, like)
    elif mutant.startswith("BLT"):
        mech = BLT(num_buffers=2)
        p = mech.parameters(n)
        change = 1.05 if "output" in mutant else 1.0
        noise = BufferedNoise(p.theta_hat, p.omega_hat * change, p.scale * (2.05 - change), n, like)
    else:
        mech = BandMF(num_bands=3)
        inner = mech.noise(n, like)
        noise = type("Scaled", (), {"step": lambda self, z: 1.05 * inner.step(z)})()
    samples = sequence(noise, n, seed=1, like=like)
    assert covariance_p_value(samples, expected_covariance(mech.matrix(n))) < ALPHA


@pytest.mark.parametrize("mechanism", [DPSGD(), BandMF(num_bands=1)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_band_passes_the_draws_through_bit_for_bit(mechanism, dtype):
    like = torch.zeros(3, 5, dtype=dtype)
    noise = mechanism.noise(10, like)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        z = torch.randn(3, 5, generator=g).to(dtype)
        w = noise.step(z)
        assert w.dtype == dtype and torch.equal(w, z)
    assert noise.state_dict()["history"].numel() == 0


@pytest.mark.parametrize("mechanism", [DPSGD(), BandMF(num_bands=5), BLT(num_buffers=3)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_and_load_mid_stream_continues_bit_for_bit(mechanism, dtype, tmp_path):
    n, like = 20, torch.zeros(4, 3, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(4, 3, generator=g, dtype=dtype) for _ in range(n)]
    first = mechanism.noise(n, like)
    for z in draws[:7]:
        first.step(z)
    torch.save(first.state_dict(), tmp_path / "noise.pt")
    rest = [first.step(z) for z in draws[7:]]
    resumed = mechanism.noise(n, like)
    resumed.load_state_dict(torch.load(tmp_path / "noise.pt", weights_only=True))
    for z, expected in zip(draws[7:], rest):
        assert torch.equal(resumed.step(z), expected)


def test_state_dict_holds_plain_tensors_and_values():
    state = BandMF(num_bands=4).noise(10, torch.zeros(3)).state_dict()
    assert set(state) == {"kind", "steps", "step", "strategy", "history"}
    assert state["strategy"].dtype == torch.float64 and state["strategy"].shape == (4,)
    assert isinstance(state["history"], torch.Tensor) and state["history"].shape == (3, 3)
    state = BLT(num_buffers=2).noise(10, torch.zeros(3)).state_dict()
    assert state["buffers"].shape == (2, 3)


def test_noise_follows_the_template_dtype_and_device():
    like = torch.zeros(2, 2, dtype=torch.float16)
    for mech in (BandMF(num_bands=3), BLT(num_buffers=2)):
        noise = mech.noise(5, like)
        w = noise.step(torch.randn(2, 2).half())
        assert w.dtype == torch.float16 and w.device == like.device
        assert noise.work_dtype == torch.float32


def test_draw_callable_supplies_the_draws():
    calls = []

    def draw(template: torch.Tensor) -> torch.Tensor:
        calls.append((template.shape, template.dtype))
        return torch.ones_like(template)

    noise = BandMF(num_bands=2).noise(4, torch.zeros(3, dtype=torch.float32), draw=draw)
    c = BandMF(num_bands=2).coefficients(4).tolist()
    w0, w1 = noise.step(), noise.step()
    assert calls == [(torch.Size([3]), torch.float32)] * 2
    torch.testing.assert_close(w0, torch.full((3,), 1 / c[0]))
    torch.testing.assert_close(w1, torch.full((3,), (1 - c[1] / c[0]) / c[0]))


def test_the_first_outputs_are_the_inverse_matrix_applied_to_the_draws():
    n = 12
    for mech in (BandMF(num_bands=5), BLT(num_buffers=3)):
        z = torch.randn(n, 2, dtype=D)
        noise = mech.noise(n, torch.zeros(2, dtype=D))
        w = torch.stack([noise.step(z[t]) for t in range(n)])
        torch.testing.assert_close(w, torch.linalg.solve_triangular(mech.matrix(n), z, upper=False),
                                   rtol=1e-10, atol=1e-12)


def test_steps_beyond_the_plan_are_refused():
    noise = BandMF(num_bands=2).noise(3, torch.zeros(2))
    for _ in range(3):
        noise.step(torch.zeros(2))
    with pytest.raises(PrivacyStateError, match=r"planned for steps=3; got a request for step 4"):
        noise.step(torch.zeros(2))


def test_wrong_draws_are_refused():
    noise = BandMF(num_bands=2).noise(3, torch.zeros(2))
    with pytest.raises(ConfigError, match=r"z must have the template's shape \(2,\); got z.shape=\(3,\)"):
        noise.step(torch.zeros(3))
    with pytest.raises(ConfigError, match=r"needs the draws z or a draw function; got z=None"):
        noise.step()


def test_a_state_from_another_mechanism_is_refused():
    like = torch.zeros(2)
    banded = BandMF(num_bands=3).noise(10, like).state_dict()
    with pytest.raises(CheckpointError, match=r"must come from a buffered generator; got kind='banded'"):
        BLT(num_buffers=2).noise(10, like).load_state_dict(banded)
    with pytest.raises(CheckpointError, match=r"same strategy; got strategy=tensor"):
        BandMF(num_bands=4).noise(10, like).load_state_dict(banded)
    with pytest.raises(CheckpointError, match=r"same strategy; got strategy=tensor"):
        BandMF(num_bands=3, workload="momentum").noise(10, like).load_state_dict(banded)
    with pytest.raises(CheckpointError, match=r"planned for the same steps; got steps=10, expected 12"):
        BandMF(num_bands=3).noise(12, like).load_state_dict(banded)
    with pytest.raises(CheckpointError, match=r"history must have shape \(2, 3\)"):
        BandMF(num_bands=3).noise(10, torch.zeros(3)).load_state_dict(banded)


def test_load_adopts_the_saved_strategy_within_a_tolerance():
    """A strategy re-optimised elsewhere may differ in its last bits: the saved one is used."""
    n, like = 12, torch.zeros(3, dtype=D)
    first = BandMF(num_bands=4).noise(n, like)
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(3, generator=g, dtype=D) for _ in range(n)]
    for z in draws[:5]:
        first.step(z)
    state = first.state_dict()
    expected = [first.step(z) for z in draws[5:]]
    nudged = BandedNoise(BandMF(num_bands=4).coefficients(n) * (1 + 1e-9), n, like)
    nudged.load_state_dict(state)
    assert all(torch.equal(nudged.step(z), w) for z, w in zip(draws[5:], expected))


def test_memory_is_b_minus_one_or_k_buffers():
    like = torch.zeros(100)
    assert BandMF(num_bands=16).noise(100, like).state_dict()["history"].shape == (15, 100)
    assert BLT(num_buffers=4).noise(100, like).state_dict()["buffers"].shape == (4, 100)
    assert math.prod(DPSGD().noise(100, like).state_dict()["history"].shape) == 0


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,)])
def test_any_template_shape_including_empty_and_scalar(shape):
    like = torch.zeros(shape)
    for mech in (DPSGD(), BandMF(num_bands=3), BLT(num_buffers=2)):
        noise = mech.noise(4, like)
        for _ in range(4):
            assert noise.step(torch.randn(shape)).shape == like.shape
