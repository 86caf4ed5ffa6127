"""TorchGaussian's multi-stream draw of large CPU tensors: the distribution (row 1 of
PRIVACY_TESTS.md on the pieces and across them), reproducibility after torch.manual_seed,
independence from the thread count, and no reuse of a stream between calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from privgrad.privatize import noise as noise_module
from privgrad.privatize.noise import STREAMS, TorchGaussian

ALPHA = 1e-3
N = 200_000  # elements per draw: each of the STREAMS pieces holds 50,000
STD = 1.7


def draw(seed: int, threads: int | None = None, n: int = N) -> torch.Tensor:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        return TorchGaussian(parallel_min=1000).sample(torch.empty(n), STD)
    finally:
        torch.set_num_threads(before)


def test_streams_are_used_for_large_tensors():
    assert noise_module._state_layout_known()  # else the source falls back to one stream
    torch.manual_seed(0)
    plain = torch.empty(N).normal_(0.0, STD)
    assert not torch.equal(draw(0), plain)


def test_reproducible_after_manual_seed_and_the_default_generator_moves_on():
    a, after_a = draw(3), torch.rand(3)
    b, after_b = draw(3), torch.rand(3)
    assert torch.equal(a, b) and torch.equal(after_a, after_b)
    assert not torch.equal(draw(4), a)


def test_the_same_noise_with_any_number_of_threads():
    assert torch.equal(draw(5, threads=1), draw(5, threads=2))


def _gaussian_pvalues(x: np.ndarray) -> list[float]:
    n = x.size
    chi = (x ** 2).sum() / STD**2  # variance test: chi-square with n degrees of freedom
    p_var = 2 * min(stats.chi2.cdf(chi, n), stats.chi2.sf(chi, n))
    p_mean = 2 * stats.norm.sf(abs(x.mean()) / (STD / np.sqrt(n)))
    p_ks = stats.kstest(x / STD, "norm").pvalue
    r = np.corrcoef(x[:-1], x[1:])[0, 1]  # lag-1 autocorrelation
    p_lag = 2 * stats.norm.sf(abs(r) * np.sqrt(n))
    return [p_var, p_mean, p_ks, p_lag]


@pytest.mark.slow
def test_every_piece_and_the_whole_are_gaussian():
    x = draw(7).double().numpy()
    for piece in np.array_split(x, STREAMS):
        assert min(_gaussian_pvalues(piece)) > ALPHA
    assert min(_gaussian_pvalues(x)) > ALPHA


@pytest.mark.slow
def test_pieces_and_successive_calls_are_uncorrelated():
    torch.manual_seed(11)
    source = TorchGaussian(parallel_min=1000)
    first = source.sample(torch.empty(N), STD).double().numpy()
    second = source.sample(torch.empty(N), STD).double().numpy()
    pieces = np.array_split(first, STREAMS) + np.array_split(second, STREAMS)
    m = len(pieces[0])
    for i in range(len(pieces)):
        for j in range(i + 1, len(pieces)):
            r = np.corrcoef(pieces[i][:m], pieces[j][:m])[0, 1]
            assert 2 * stats.norm.sf(abs(r) * np.sqrt(m)) > ALPHA / 28, (i, j, r)
    assert not np.array_equal(first, second)


def test_unknown_generator_layout_falls_back_to_one_stream(monkeypatch):
    monkeypatch.setattr(noise_module, "_state_layout_known", lambda: False)
    torch.manual_seed(2)
    plain = torch.empty(N).normal_(0.0, STD)
    assert torch.equal(draw(2), plain)


def test_zero_std_and_small_tensors():
    assert torch.equal(TorchGaussian().sample(torch.empty(5), 0.0), torch.zeros(5))
    torch.manual_seed(1)
    small = TorchGaussian().sample(torch.empty(10), STD)
    torch.manual_seed(1)
    assert torch.equal(small, torch.empty(10).normal_(0.0, STD))


def test_sample_many_draws_each_dtype_once_into_views_of_one_buffer():
    likes = [((300, 400), torch.float32, "cpu"), ((7,), torch.float64, "cpu"),
             ((500,), torch.float32, "cpu"), ((3, 1, 2), torch.float64, "cpu")]
    source = TorchGaussian(parallel_min=1000)
    out = source.sample_many(likes, STD)
    assert [(t.shape, t.dtype, t.device.type) for t in out] == [
        (torch.Size(s), d, dev) for s, d, dev in likes]
    assert out[0].untyped_storage().data_ptr() == out[2].untyped_storage().data_ptr()
    assert out[1].untyped_storage().data_ptr() == out[3].untyped_storage().data_ptr()
    big = torch.cat([out[0].reshape(-1), out[2]]).double()
    assert abs(float(big.mean())) < 5 * STD / big.numel() ** 0.5
    assert abs(float(big.std()) / STD - 1) < 0.01  # 120,500 draws: sd of the ratio ~0.002
    torch.manual_seed(3)
    first = source.sample_many(likes, STD)
    torch.manual_seed(3)
    again = source.sample_many(likes, STD)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # follows torch.manual_seed
    assert not torch.equal(first[0], source.sample_many(likes, STD)[0])
    assert all(not t.any() for t in source.sample_many(likes, 0.0))


def _cpu_likes():
    return [((300, 40), torch.float32, "cpu"), ((50,), torch.float32, "cpu")]


def _base_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_sample_many_refills_its_buffer_once_no_view_is_held():
    if noise_module._use_count_baseline() is None:
        pytest.skip("this PyTorch does not count a storage's users")
    source = TorchGaussian()
    out = source.sample_many(_cpu_likes(), STD)
    ptr = _base_ptr(out[0])
    del out
    torch.manual_seed(5)
    again = source.sample_many(_cpu_likes(), STD)
    assert _base_ptr(again[0]) == ptr  # the same memory, written again
    torch.manual_seed(5)
    fresh = TorchGaussian().sample_many(_cpu_likes(), STD)
    assert all(torch.equal(a, b) for a, b in zip(again, fresh))  # the same draw as a new buffer


@pytest.mark.parametrize("holder", ["view", "view of a view", "numpy", "grad"])
def test_sample_many_never_writes_memory_someone_still_uses(holder):
    source = TorchGaussian()
    out = source.sample_many(_cpu_likes(), STD)
    p = torch.nn.Parameter(torch.zeros(50))
    kept = {"view": lambda: out[1], "view of a view": lambda: out[0][3:5].view(-1),
            "numpy": lambda: out[0].numpy(), "grad": lambda: setattr(p, "grad", out[1])}[holder]()
    snapshot = [t.clone() for t in out]
    ptr = _base_ptr(out[0])
    del out
    again = source.sample_many(_cpu_likes(), STD)
    assert _base_ptr(again[0]) != ptr
    if holder == "grad":
        assert torch.equal(p.grad, snapshot[1])
    elif holder == "numpy":
        assert np.array_equal(kept, snapshot[0].numpy())
    else:
        assert torch.equal(kept, (snapshot[1] if holder == "view" else snapshot[0][3:5].view(-1)))
    if noise_module._use_count_baseline() is not None:
        # the source let go of the held buffer: once the newer one is free, it is reused
        del kept
        p.grad = None
        newer = _base_ptr(again[0])
        del again
        assert _base_ptr(source.sample_many(_cpu_likes(), STD)[0]) == newer
