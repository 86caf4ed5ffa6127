"""privgrad.layers.kernels.linear equals F.linear (large float32 CPU products run on oneDNN
there), and sum_of_outer is the weighted sum of outer products."""

import pytest
import torch
import torch.nn.functional as F

from privgrad.layers import kernels


def operands():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 9, generator=gen)
    w = torch.randn(5, 9, generator=gen)
    b = torch.randn(5, generator=gen)
    big = torch.randn(300, 70, generator=gen)
    return [(x, w, b), (x, w, None), (x[:, 2], w, b), (x.flatten(0, 1).T, big[:24, :7].T, None),
            (big, big[:33], None), (big.T, big.T[:40], None)]


@pytest.fixture
def onednn_for_all_sizes(monkeypatch):
    """The oneDNN path for every product, so the small operands below exercise it."""
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)


@pytest.mark.parametrize("case", range(6))
def test_linear_matches_f_linear_in_float32(case, onednn_for_all_sizes):
    x, w, b = operands()[case]
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = kernels.linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_linear_keeps_autograd_and_other_dtypes_on_f_linear(monkeypatch, onednn_for_all_sizes):
    kernels._onednn_linear_works()  # its one-time check calls the op itself
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.append(1) or F.linear(*a[:3]), raising=False)
    x, w, b = operands()[0]
    kernels.linear(x.double(), w.double(), b.double())
    out = kernels.linear(x.requires_grad_(), w, b)  # needs autograd: never the oneDNN call
    out.sum().backward()
    assert x.grad is not None and not calls
    with torch.no_grad():
        kernels.linear(x, w, b)
    assert calls == ([1] if kernels._onednn_linear_works() else [])


def test_small_products_stay_on_f_linear(monkeypatch):
    kernels._onednn_linear_works()
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.append(a[0].shape) or F.linear(*a[:3]), raising=False)
    small = torch.randn(256, 10), torch.randn(256, 10)  # 256 * 10 * 256 multiply-adds
    m, k, n = 64, 256, kernels.ONEDNN_MIN_MACS // (64 * 256)  # exactly at the threshold
    large = torch.randn(m, k), torch.randn(n, k)
    with torch.no_grad():
        assert torch.allclose(kernels.linear(*small), F.linear(*small))
        assert torch.allclose(kernels.linear(*large), F.linear(*large), rtol=1e-5, atol=1e-4)
    assert calls == ([(m, k)] if kernels._onednn_linear_works() else [])


def test_onednn_is_used_on_this_build():
    # The CPU wheels CI installs ship oneDNN: the fast path above is the one tested.
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    assert kernels._onednn_linear_works()


@pytest.mark.parametrize("p,q", [(3, 40), (40, 3), (7, 7)])
def test_sum_of_outer_products(p, q):
    gen = torch.Generator().manual_seed(p * q)
    a, b = torch.randn(200, p, generator=gen), torch.randn(200, q, generator=gen)
    got = kernels.sum_of_outer(a, b)
    assert got.is_contiguous() and got.shape == (p, q)
    assert torch.allclose(got.double(), a.double().T @ b.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p,q", [(3, 40), (40, 3), (7, 7)])
def test_sum_of_outer_products_with_row_weights(p, q, dtype):
    # sum_n w_n a_n^T b_n: the narrower operand is scaled while it is written transposed
    gen = torch.Generator().manual_seed(p * q + 1)
    a, b = torch.randn(200, p, generator=gen).to(dtype), torch.randn(200, q, generator=gen).to(dtype)
    w = torch.rand(200, generator=gen).to(dtype)
    expected = torch.einsum("n,np,nq->pq", w.double(), a.double(), b.double())
    got = kernels.sum_of_outer(a, b, w)
    assert got.is_contiguous() and got.shape == (p, q) and got.dtype == dtype
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4)
    a.requires_grad_()  # inputs that need autograd take the differentiable path
    kernels.sum_of_outer(a, b, w).sum().backward()
    assert torch.allclose(a.grad.double(), w.double()[:, None] * b.double().sum(1, keepdim=True).expand(-1, p),
                          rtol=1e-5, atol=1e-5)
