"""Matrix products for the rules' own arithmetic, by the fastest exact kernel PyTorch has.

PyTorch's CPU ``matmul``/``F.linear`` in float32 call the BLAS it was built with (MKL), while its
native layers (convolutions, ``nn.LSTM``) run on oneDNN. On some CPUs the two differ by 2-3x
for the products of a forward pass (``x @ W.T``): on the AMD EPYC machine of
``docs/performance.md`` a ``(4096 x 256) @ (256 x 1024)`` product takes 14 ms through MKL and
5.4 ms through oneDNN, and a recurrent step's ``(64 x 256) @ (256 x 1024)`` 0.38 against 0.16
ms. The recurrent rules replace the native kernels' backward passes with their own such
products, so they use ``linear()``: oneDNN for float32 CPU tensors that need no autograd and
make a product of at least ``ONEDNN_MIN_MACS`` multiply-adds, checked once against
``F.linear`` (same result up to float32 rounding); ``F.linear`` everywhere else (GPUs, other
dtypes, a PyTorch built without oneDNN, and small products, where oneDNN's fixed cost of about
30 us is more than the product: ``(256 x 10) @ (10 x 256)`` 0.057 against 0.028 ms).

The clipped sums have the other layout: ``a.T @ b``, contracting the rows (examples, positions).
There MKL reads the transposed operand in place and was within 2% of oneDNN or faster at every
shape measured (13 shapes, rows 64 to 32,768, widths 10 to 1,024, interleaved on the same
machine: oneDNN took 0.98-2.83x MKL's time, 0.98-1.37x for the products above 10^8 multiply-
adds), so ``sum_of_outer()`` calls ``torch.mm``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

#: Products smaller than this (``m * k * n`` multiply-adds) stay on ``F.linear``: measured on the
#: benchmark machine, oneDNN is slower below it (its fixed cost) and level or faster above.
ONEDNN_MIN_MACS = 1 << 23


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, as ``F.linear`` (``weight`` may be a transposed view)."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.numel() and weight.numel()
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
                bias is not None and bias.requires_grad)))
            and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
            and not torch.compiler.is_compiling()  # inductor cannot lower it on traced weights
            and _onednn_linear_works()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def sum_of_outer(a: torch.Tensor, b: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``a.T @ b`` for ``a: (n, p)`` and ``b: (n, q)`` (a sum of ``n`` outer products, the shape
    of every clipped sum), with row ``k`` scaled by ``row_weights[k]`` if given (``(n,)``).

    The weights scale the narrower operand (the cheaper multiply); the product is one
    ``torch.mm`` that reads ``a`` transposed in place, and is contiguous."""
    if row_weights is not None:
        w = row_weights.to(a.dtype).view(-1, 1)
        if a.shape[1] <= b.shape[1]:
            a = a * w
        else:
            b = b * w
    return torch.mm(a.T, b)


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
