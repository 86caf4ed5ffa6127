"""Mixed precision under the privacy engine: autocast (bf16, fp16) and ``torch.amp.GradScaler``.

Three rules, each for a privacy reason:

1. **Per-sample work in float32.** Captured half-precision inputs and output gradients are upcast
   before any layer rule runs, so per-sample gradients, their norms and the clipped sum are
   computed and accumulated in float32 (a norm that overflows half precision would otherwise
   drop the example as non-finite).
2. **The loss scale is divided out before clipping.** With a scaler, backward computes gradients
   of ``S * loss``; the engine divides every captured output gradient by ``S`` (per-sample
   gradients are linear in them), so clipping sees the gradient of the loss itself. ``S`` is
   a power of two, so the division is exact.
3. **The scaler never decides on private data.** ``GradScaler.step`` skips ``optimizer.step()``
   when the gradients it inspects hold an inf. The raw autograd gradient depends on every
   example un-noised: one example whose gradient overflows would make the step skip, a visible
   event that reveals that the example was sampled. So at the end of each backward pass the
   engine zeroes the raw gradients of the privatised parameters (it overwrites them at the step
   anyway): the scaler sees finite values, never skips, and the example is dropped by clipping's
   non-finite rule instead (counted in ``engine.last_step_stats.dropped``). The price: the
   scaler no longer backs off, and its scale grows every ``growth_interval`` steps; watch the
   dropped count, or prefer bf16, which needs no scaler.

Should ``optimizer.step()`` still not run after a backward pass (a loop that skips it, a scaler
that skipped for another reason), the next backward pass discards the clipped sums left behind:
releasing them with the next batch's would put two Poisson samples under one noise draw and one
accounted step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils._pytree import tree_map

from privgrad import _validate
from privgrad.errors import ConfigTypeError
from privgrad.layers import Capture

__all__ = ["ScalerLink", "check_grad_scaler", "float32_captures"]

_HALF = (torch.float16, torch.bfloat16)


def _power_of_two(x: float) -> bool:
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


def check_grad_scaler(grad_scaler) -> torch.amp.GradScaler | None:
    """``grad_scaler`` if it is ``None`` or a usable ``torch.amp.GradScaler``, else an error.

    Its scale, growth and backoff factors must be powers of two: the engine divides per-sample
    gradients by the scale, and only a power of two divides out exactly (any rounding would let
    a clipped example exceed ``max_grad_norm`` by that rounding).
    """
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise ConfigTypeError(
            f"grad_scaler must be a torch.amp.GradScaler; got grad_scaler="
            f"{type(grad_scaler).__name__}. Pass torch.amp.GradScaler(device), or None.")
    state = grad_scaler.state_dict() if grad_scaler.is_enabled() else {}
    for name in ("scale", "growth_factor", "backoff_factor"):
        value = state.get(name, 1.0)
        if not _power_of_two(float(value)):
            raise _validate.fail(
                f"the grad_scaler's {name} must be a power of two (so that dividing the loss "
                f"scale out of per-sample gradients is exact and clipping holds exactly)",
                f"grad_scaler {name}", value,
                "Use GradScaler(init_scale=2.**16, growth_factor=2.0, backoff_factor=0.5).")
    return grad_scaler


def float32_captures(captures: list[Capture], loss_scale: float = 1.0) -> list[Capture]:
    """Copies of ``captures`` with half-precision tensors in float32 and output gradients divided
    by ``loss_scale``; the captures themselves when there is nothing to do."""

    def up(x):
        if isinstance(x, torch.Tensor) and x.dtype in _HALF:
            return x.float()
        return x

    def grad(g):
        g = up(g)
        return g if loss_scale == 1.0 or not isinstance(g, torch.Tensor) else g / loss_scale

    out = []
    for c in captures:
        half = any(x.dtype in _HALF for x in c.tensors())
        if not half and loss_scale == 1.0:
            out.append(c)
            continue
        # scratch={}: what a rule computed from the raw (scaled, half) gradients during
        # backward (a joint backward's recomputation) must be computed again from these.
        out.append(dataclasses.replace(
            c, args=tree_map(up, c.args), kwargs=tree_map(up, c.kwargs),
            grad_outputs=[grad(g) for g in c.grad_outputs], scratch={}))
    return out


class ScalerLink:
    """The engine's side of a ``GradScaler``: the loss scale of each backward pass, raw gradients
    hidden from the scaler, and clipped sums that no step released discarded.

    Attributes:
        scaler: the user's ``torch.amp.GradScaler`` (used as is, never wrapped).
        discarded_passes: backward passes whose clipped sums were discarded because no
            ``optimizer.step()`` followed them.
    """

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler
        self.discarded_passes = 0

    def loss_scale(self) -> float:
        """The factor the current backward pass's loss was multiplied by."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def discard(self, clipped) -> None:
        """Drop the clipped sums a backward pass left when its ``optimizer.step()`` did not run."""
        self.discarded_passes += 1
        clipped.reset()

    def hide_raw_gradients(self, params) -> None:
        """Zero the raw autograd gradients (the engine overwrites them at the step), so that the
        scaler's inf check sees nothing that depends on private data. Parameters whose raw
        gradient backward never formed get zeros: the scaler refuses to step an optimizer with
        no gradient to inspect."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
