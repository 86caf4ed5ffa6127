"""The release: the clipped sum of one logical step, plus the Gaussian noise, scaled like an
ordinary gradient (``noisy_gradients``). Plain tensors in, plain tensors out: the clipped sums
are formed by the engine (``privgrad.engine.clipped_sum.ClippedSum``), added across
processes in data-parallel training, and handed over.

Privacy:
    The ordinary autograd gradient never reaches the parameters: ``p.grad`` is overwritten with
    ``(sum_b clip(g_b) + N(0, (sigma C)^2 I)) / normaliser`` where the normaliser is 1 for
    ``loss_reduction="sum"`` and the *expected* batch size ``q N`` for ``"mean"`` (never the
    realised batch size, which depends on the private sampling outcome).
"""

from __future__ import annotations

import torch
from torch import nn

from privgrad._precision import accumulation_dtype


def noisy_gradients(
    params: list[nn.Parameter],
    sums: dict[nn.Parameter, torch.Tensor],
    *,
    noise_std: float,
    normaliser: float,
    noise,
) -> dict[nn.Parameter, torch.Tensor]:
    """``(sum + N(0, noise_std^2)) / normaliser`` for every parameter, in its own dtype.

    A parameter no example reached still gets the noise (its sum is zero): noise lands on every
    privatised parameter exactly once per call. ``sums`` may hold sparse tensors (embeddings).

    With PyTorch's generator ([`TorchGaussian`][privgrad.privatize.noise.TorchGaussian]) the result
    is formed as ``z + sum / normaliser`` with ``z ~ N(0, (noise_std / normaliser)^2)`` drawn
    straight into the buffer that becomes ``p.grad``: the same distribution, one pass over the
    parameter instead of three, and a sparse sum touches only its rows. The noise of all parameters
    of one dtype and device is one draw
    ([`TorchGaussian.sample_many()`][privgrad.privatize.noise.TorchGaussian.sample_many]), so the
    gradients are views into one buffer. Other sources (secure mode) add the noise to the sum
    themselves, and the result is divided afterwards.
    """
    out = {}
    if noise.fuses_sums:
        draws = noise.sample_many([(p.shape, accumulation_dtype(p.dtype), p.device) for p in params],
                                  noise_std / normaliser)
        dense_draws, dense_sums = [], []
        for p, g in zip(params, draws):
            s = sums.get(p)
            if s is None:
                pass
            elif s.is_sparse:
                g.add_(s, alpha=1.0 / normaliser)
            else:
                dense_draws.append(g)
                dense_sums.append(s)
        if dense_draws:  # one grouped add (one kernel per dtype and device where supported)
            torch._foreach_add_(dense_draws, dense_sums, alpha=1.0 / normaliser)
        for p, g in zip(params, draws):
            out[p] = g if g.dtype == p.dtype else g.to(p.dtype)
        return out
    for p in params:
        s = sums.get(p)
        total = s if s is not None else torch.zeros_like(p, dtype=accumulation_dtype(p.dtype))
        total = total.to_dense() if total.is_sparse else total
        g = noise.add_noise(total, noise_std)  # the source adds: secure mode snaps the result
        if normaliser != 1.0:
            g.div_(normaliser)
        out[p] = g if g.dtype == p.dtype else g.to(p.dtype)
    return out
