"""The per-sample gradients must add up to autograd's gradient.

Every per-sample method privgrad has (a layer rule, the generic ``torch.func`` rule, the capture
of a module's calls) is checked here against the one computation that cannot miss anything:
autograd's ordinary gradient of the same loss. For each parameter the unclipped sum of its
per-sample gradients must equal that gradient. A capture that was dropped (reentrant activation
checkpointing), a weight also used outside its module's call (``F.linear(h, emb.weight)`` as a
tied head), a parametrisation a rule does not know, a module served by two rules, or a future
bug in a rule makes the two differ, and the step is refused with the parameter's name instead
of releasing a gradient whose clipping bound does not hold.

The engine runs the check on the first backward pass that has examples, again after the set of
trainable parameters changes, and on every pass with ``make_private(..., check="every_step")``.
It costs autograd's parameter gradients for that pass (the fast paths that skip them are off
while checking) and one unclipped weighted sum.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from privgrad.engine.batch import BackwardBatch
from privgrad.errors import PrivacyStateError

__all__ = ["FLOOR", "check_sums", "mismatched", "tolerance"]

#: Sizes below this fraction of the whole model's gradient are compared at that fraction: a
#: difference there changes no clipping factor measurably, and rounding dominates it.
FLOOR = 1e-3


def tolerance(dtype: torch.dtype, device: torch.device, loose: bool = False) -> float:
    """Relative tolerance of the comparison: rounding only (both sides are exact in exact
    arithmetic). CUDA float32 allows for TF32 convolutions and products (10-bit mantissa);
    ``loose`` (autocast) for half-precision arithmetic."""
    if loose:
        return 3e-2
    if dtype == torch.float64:
        return 1e-7
    if dtype == torch.float32 and device.type == "cpu":
        return 1e-3
    return 3e-2


def _distance(s: torch.Tensor, g: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``||s - g||`` without writing either (a rule's sum may be a view of its own tensors),
    in pieces of ``chunk`` elements: no temporary as large as an embedding table."""
    if s.shape != g.shape or s.numel() <= chunk:
        return torch.linalg.vector_norm(s - g)
    s, g = s.reshape(-1), g.reshape(-1)
    squares = [torch.linalg.vector_norm(a - b).square()
               for a, b in zip(s.split(chunk), g.split(chunk))]
    return torch.stack(squares).sum().sqrt()


def _sparse_norms(s: torch.Tensor, g: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``[||g||, ||s||, ||s - g||]`` for a row-sparse ``s`` (an embedding's sum) and a dense
    ``g``, without a dense copy of either: the touched rows are compared directly, every other
    row of ``g`` must be zero and counts whole (no subtraction of large sums, which would
    cancel in float32)."""
    s = s.coalesce()
    rows, values = s.indices()[0], s.values()
    touched = torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
    touched[rows] = True
    flat = g.reshape(g.shape[0], -1)
    per_row = max(1, chunk // max(1, flat.shape[1]))
    row_sq = torch.cat([c.square().sum(1) for c in flat.split(per_row)])
    untouched = row_sq[~touched].sum()
    near = torch.linalg.vector_norm(flat.index_select(0, rows) - values.reshape(len(rows), -1))
    return torch.stack([row_sq.sum().sqrt(), torch.linalg.vector_norm(values),
                        (near.square() + untouched).sqrt()])


def mismatched(rows: list, names: dict, loose: bool = False) -> list[tuple[str, float]]:
    """``(name, relative difference)`` of each parameter whose per-sample sum differs from
    autograd's gradient beyond its dtype's tolerance; ``rows``: ``(parameter, difference,
    size)``. A parameter whose gradient is zero in exact arithmetic (an attention key's bias)
    holds rounding residue on both sides: it is compared at the scale of the whole model's
    gradient (``FLOOR`` times the root-sum-of-squares of the sizes)."""
    floor = FLOOR * math.sqrt(sum(size * size for _, _, size in rows))
    return [(names.get(p, str(tuple(p.shape))), diff / max(size, floor))
            for p, diff, size in rows
            if diff > tolerance(p.dtype, p.device, loose) * max(size, floor) + 1e-30]


def check_sums(batch: BackwardBatch, params: list[nn.Parameter], names: dict, *,
               loss_scale: float = 1.0, loose: bool = False) -> bool:
    """Compare, per parameter, the unclipped sum of per-sample gradients with ``p.grad``.

    ``p.grad`` must hold autograd's gradient of this pass alone (the engine clears it before
    the checked forward pass), times ``loss_scale`` (a GradScaler's). ``loose``: the pass ran
    under autocast (half-precision rounding on autograd's side).

    Returns:
        ``True`` if the check was conclusive and passed; ``False`` if it could not decide
        (no examples, or a gradient that is not finite: checked again on the next pass).

    Raises:
        PrivacyStateError: a parameter whose per-sample gradients do not add up, named.
    """
    if batch.batch_size == 0:
        return False
    like = next(iter(batch.norms_sq.values()), None)
    ones = torch.full((batch.batch_size,), 1.0 / batch.scale,
                      dtype=like.dtype if like is not None else torch.float32,
                      device=like.device if like is not None else None)
    sums = batch.weighted_sums(ones, sparse=True)  # embeddings: only the rows the batch used
    rows = []  # (parameter, difference, size)
    for p in params:
        s, g = sums.get(p), p.grad
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        if g is None:
            g = torch.zeros((), dtype=dtype, device=p.device)
        elif g.dtype != dtype or loss_scale != 1.0:
            g = g.detach().to(dtype) / loss_scale
        else:
            g = g.detach()  # (read only: no copy of a large gradient)
        s = torch.zeros((), dtype=dtype, device=g.device) if s is None else s.to(dtype)
        if s.is_sparse and s.sparse_dim() == 1 and s.shape == g.shape:
            g_norm, s_norm, diff = _sparse_norms(s, g).tolist()
        else:
            s = s.to_dense() if s.is_sparse else s
            g_norm, s_norm, diff = torch.stack([
                torch.linalg.vector_norm(g), torch.linalg.vector_norm(s), _distance(s, g)]).tolist()
        if not all(math.isfinite(v) for v in (g_norm, s_norm, diff)):
            return False
        sq = batch.norms_sq.get(p)
        spread = 0.0 if sq is None else math.sqrt(float(sq.sum())) / batch.scale
        rows.append((p, diff, max(g_norm, s_norm, spread)))
    wrong = mismatched(rows, names, loose)
    if wrong:
        listed = ", ".join(f"{n} (relative difference {r:.2g})" for n, r in wrong[:6])
        raise PrivacyStateError(
            f"the per-sample gradients of every parameter must add up to autograd's gradient "
            f"(else their clipping does not bound what is released); got {len(wrong)} "
            f"parameter(s) that do not: {listed}. Nothing was released. Usual causes: reentrant "
            f"activation checkpointing (pass use_reentrant=False; Hugging Face: "
            f"gradient_checkpointing_kwargs={{'use_reentrant': False}}); a weight used outside "
            f"its module's call (F.linear(h, emb.weight) as a tied head: call a module that "
            f"shares the weight instead); a parametrisation no rule knows (old-style "
            f"torch.nn.utils.weight_norm: use torch.nn.utils.parametrizations.weight_norm, or "
            f"freeze it); a layer served by two rules or a custom rule that is wrong (check it "
            f"with tests like tests/layers/test_rules.py).")
    return True
