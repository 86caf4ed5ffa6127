"""Matrix products for the rules' own arithmetic, by the fastest exact kernel PyTorch has.

PyTorch's CPU ``matmul``/``F.linear`` in float32 call the BLAS it was built with (MKL), while its
native layers (convolutions, ``nn.LSTM``) run on oneDNN. On some CPUs the two differ by 2-3x:
on the AMD EPYC machine of ``docs/performance.md`` a ``(4096 x 256) @ (256 x 1024)`` product
takes 14 ms through MKL and 5.4 ms through oneDNN, and a recurrent step's ``(64 x 256) @
(256 x 1024)`` 0.38 against 0.16 ms. The rules replace native kernels' backward passes with
their own products (the recurrent layers' backpropagation through time, the clipped sums), so
they use :func:`linear` for them: oneDNN for float32 CPU tensors that need no autograd, checked
once against ``F.linear`` (same result up to float32 rounding); ``F.linear`` everywhere else
(GPUs, other dtypes, a PyTorch built without oneDNN).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, as ``F.linear`` (``weight`` may be a transposed view)."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.numel() and weight.numel()
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
                bias is not None and bias.requires_grad)))
            and _onednn_linear_works()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def sum_of_outer(a: torch.Tensor, b: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``a.T @ b`` for ``a: (n, p)`` and ``b: (n, q)`` (a sum of ``n`` outer products, the shape
    of every clipped sum), with row ``k`` of the narrower operand scaled by ``row_weights[k]``
    if given (``(n,)``).

    The narrower operand goes first, as the one the product reads transposed: oneDNN would
    copy it into that layout, so the weighting pass writes it there itself (one pass instead of
    a multiply and a copy: 58 -> 53 ms for an LSTM's ``(16384, 256) x (16384, 1024)`` sum)."""
    first = a.shape[1] <= b.shape[1]
    x, y = (a, b) if first else (b, a)
    if row_weights is None:
        xt = x.T
    elif torch.is_grad_enabled() and (x.requires_grad or row_weights.requires_grad):
        xt = (x * row_weights.to(x.dtype).view(-1, 1)).T  # (out= does not differentiate)
    else:
        xt = torch.empty((x.shape[1], x.shape[0]), dtype=x.dtype, device=x.device)
        torch.mul(x.T, row_weights.to(x.dtype).view(1, -1), out=xt)
    product = linear(xt, y.T)
    return product if first else product.T.contiguous()


@functools.cache
def _onednn_linear_works() -> bool:
    """Whether this PyTorch has the oneDNN product and it agrees with ``F.linear`` (checked on
    contiguous, transposed and batched operands)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=gen)
    w = torch.randn(6, 7, generator=gen)
    b = torch.randn(6, generator=gen)
    try:
        with torch.no_grad():
            cases = [(x, w, b), (x[:, 1], w, None), (x[0].T, x[1].T, None)]
            return all(torch.allclose(op(a, m, c, "none", [], ""), F.linear(a, m, c),
                                      rtol=1e-5, atol=1e-6) for a, m, c in cases)
    except (RuntimeError, TypeError):
        return False
