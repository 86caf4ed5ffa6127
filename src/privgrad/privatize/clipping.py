"""Per-sample clipping: from squared per-sample norms to the weights of the clipped sum.

Flat clipping scales example ``b``'s whole gradient by ``min(1, C / ||g_b||)``; per-layer
clipping gives parameter ``k`` its own bound ``C_k`` (by default ``C / sqrt(K)``, so that the
per-layer bounds compose to ``sqrt(sum C_k^2) = C``) and scales each parameter's gradient by
``min(1, C_k / ||g_bk||)``. Automatic clipping (AUTO-S: Bu, Wang, Zha and Karypis, NeurIPS 2023)
scales every example to ``C g_b / (||g_b|| + gamma)``: no example is left as it is, so no bound
has to be tuned; the learning rate absorbs the scale (an update is about ``lr * C`` per example
whatever the gradients' size). Adaptive clipping (``privgrad.privatize.adaptive``) clips flat
at a bound that moves every step.

Privacy:
    The clipped sum ``sum_b w_b g_b`` changes by at most ``C`` (in L2) when one example is added
    or removed (automatic clipping: ``C ||g|| / (||g|| + gamma) < C``), which is the
    sensitivity the Gaussian noise ``N(0, (sigma C)^2)`` is calibrated
    to. An example whose norm is not finite (NaN or inf loss or gradient) gets weight 0 and is
    reported in ``ClipResult.dropped``: its contribution is removed instead of turning the
    whole update into NaN (which would reveal that it was sampled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

CLIPPING = ("flat", "per_layer", "automatic", "adaptive", "per_layer_adaptive")


@dataclass
class ClipResult:
    """Weights of one backward pass's clipped sum.

    Attributes:
        weights: ``(B,)`` (flat, automatic) or ``{parameter: (B,)}`` (per-layer) factors, in
            ``[0, 1]`` except automatic clipping's ``C / (||g|| + gamma)``.
        keep: ``(B,)`` bool, False for examples dropped because a norm was not finite; ``None``
            from flat clipping when none was dropped (every example is kept).
        clipped: number of kept examples whose contribution the clipping shrank.
        dropped: number of examples dropped.
        within: number of examples whose norm is at most the bound (a dropped example is not
            within): adaptive clipping's count; per-layer: ``{parameter: count}``.
    """

    weights: torch.Tensor | dict
    keep: torch.Tensor | None
    clipped: int
    dropped: int
    within: int | dict = 0


def _factor(norm: torch.Tensor, bound: float, *, finite: bool = False) -> torch.Tensor:
    """``min(1, bound / norm)``, 0 where the norm is not finite, 1 where it is 0.

    (``bound / 0 = inf`` clamps to 1, ``bound / inf = 0``, and ``NaN`` becomes 0.) ``finite``:
    the caller knows every norm is finite; the factors are then written over ``norm`` (bit for
    bit the same: ``bound / x`` is ``x.reciprocal() * bound`` in PyTorch), without the NaN pass.
    """
    if finite:
        return norm.reciprocal_().mul_(bound).clamp_(max=1.0)
    return (bound / norm).clamp_(max=1.0).nan_to_num_(nan=0.0)


def _total_norm(norms_sq: dict[nn.Parameter, torch.Tensor], batch_size: int, device) -> torch.Tensor:
    """``||g_b||`` with ``||g_b||^2`` summed over all parameters (float64 if any part is)."""
    if norms_sq:
        values = list(norms_sq.values())
        dtype = torch.float64 if any(sq.dtype == torch.float64 for sq in values) else torch.float32
        if any(sq.dtype != dtype for sq in values):
            values = [sq.to(dtype) for sq in values]
        return torch.stack(values).sum(0).sqrt_()
    return torch.zeros(batch_size, device=device)


def _flat_counts(norm: torch.Tensor, bound: float) -> tuple[int, int, int]:
    """``(clipped, dropped, within)`` of ``ClipResult`` for flat clipping at ``bound``, counted on
    the host: one copy of the ``B`` norms (on the CPU, a view), where counting them on the
    device took seven small operations and a copy of the counts. The comparisons are the
    device's: ``bound`` is rounded to the norms' dtype first, as ``norm > bound`` does."""
    host = norm.detach().cpu().numpy()
    finite = np.isfinite(host)
    over = (host > host.dtype.type(bound)) & finite
    dropped, clipped = host.size - int(finite.sum()), int(over.sum())
    return clipped, dropped, host.size - dropped - clipped


def flat_clip(norms_sq: dict[nn.Parameter, torch.Tensor], max_grad_norm: float,
              batch_size: int, device=None) -> ClipResult:
    """Weights ``min(1, C / ||g_b||)`` with ``||g_b||^2`` summed over all parameters."""
    norm = _total_norm(norms_sq, batch_size, device)
    clipped, dropped, within = _flat_counts(norm, max_grad_norm)
    if dropped:
        return ClipResult(_factor(norm, max_grad_norm), torch.isfinite(norm), clipped, dropped,
                          within)
    # every norm finite (counted above): no mask, and the factors written over the norms
    return ClipResult(_factor(norm, max_grad_norm, finite=True), None, clipped, dropped, within)


def automatic_clip(norms_sq: dict[nn.Parameter, torch.Tensor], max_grad_norm: float,
                   gamma: float, batch_size: int, device=None) -> ClipResult:
    """Weights ``C / (||g_b|| + gamma)`` (AUTO-S); 0 where the norm is not finite."""
    norm = _total_norm(norms_sq, batch_size, device)
    keep = torch.isfinite(norm)
    weights = (max_grad_norm / (norm + gamma)).nan_to_num_(nan=0.0, posinf=0.0)
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    clipped, dropped = torch.stack([((weights < 1) & keep).sum(), (~keep).sum()]).tolist()
    return ClipResult(weights, keep, clipped, dropped)


def per_layer_clip(norms_sq: dict[nn.Parameter, torch.Tensor], bounds: dict[nn.Parameter, float],
                   batch_size: int, device=None) -> ClipResult:
    """Weights ``min(1, C_k / ||g_bk||)`` per parameter ``k``; an example with any non-finite
    norm is dropped from every parameter."""
    keep = torch.ones(batch_size, dtype=torch.bool, device=device)
    for sq in norms_sq.values():
        keep = keep & torch.isfinite(sq)
    weights, over, within = {}, torch.zeros_like(keep), []
    for p, sq in norms_sq.items():
        norm = sq.sqrt()
        weights[p] = torch.where(keep, _factor(norm, bounds[p]), torch.zeros_like(norm))
        over = over | (norm > bounds[p])
        within.append(((norm <= bounds[p]) & keep).sum())
    clipped, dropped, *counts = torch.stack([(over & keep).sum(), (~keep).sum(), *within]).tolist()
    return ClipResult(weights, keep, clipped, dropped, dict(zip(norms_sq, counts)))


def per_layer_bounds(params: list[nn.Parameter], max_grad_norm) -> dict[nn.Parameter, float]:
    """Per-parameter bounds: a float is split equally (``C / sqrt(K)``); a sequence gives one
    bound per parameter, in order. Their root-sum-of-squares is the total bound ``C``."""
    if isinstance(max_grad_norm, (int, float)):
        each = float(max_grad_norm) / math.sqrt(max(1, len(params)))
        return {p: each for p in params}
    return dict(zip(params, (float(c) for c in max_grad_norm)))
