"""Fixed-shape batches (``max_batch_size``): which rows of a backward pass are padding.

The truncated Poisson loader pads every batch to ``M`` rows after the real ones and records how
many are real. ``real_rows()`` turns that record into a ``(rows,)`` mask for one pass (a
physical batch of virtual batches covers rows ``[offset, offset + rows)`` of the drawn batch);
``ClippedSum.add`` then drops the padding rows as it drops non-finite ones: their inputs and
output gradients are zeroed before any sum, their norms never reach the clipping statistics.

Privacy:
    A padding row adds exactly nothing: per-sample gradients are linear in the output gradient,
    which is zero for it (and ``torch.where`` keeps a NaN or inf of a padding row out too). The
    mask is read for the batch the loader yielded last only (``groups.latest_batch()``).
"""

from __future__ import annotations

import torch

from privgrad.engine.groups import latest_batch
from privgrad.layers import Capture

__all__ = ["real_rows"]


def real_rows(rows, tags: set, captures: list[Capture]) -> torch.Tensor | None:
    """``(rows,)`` bool, True for the real rows of this pass; ``None`` where the pass is not on
    a drawn batch (it is set aside, never released)."""
    found = latest_batch(rows, tags, captures, "real_rows",
                         lambda real: rows.drawn.sampler.max_batch_size)
    if found is None:
        return None
    real, offset, count = found
    device = next((g.device for c in captures for g in c.grad_outputs
                   if isinstance(g, torch.Tensor)), None)
    return torch.arange(offset, offset + count, device=device) < real
