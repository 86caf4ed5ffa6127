"""The private step, in three separate stages:

1. :class:`ClippedSum` clips each physical batch's per-sample gradients and adds them up over
   the physical batches of one logical step (virtual batches);
2. (distributed training only) the clipped sums are added across processes;
3. :func:`noisy_gradients` draws the noise once per logical step, adds it, and scales the result
   like an ordinary gradient.

Privacy:
    The ordinary autograd gradient never reaches the parameters: ``p.grad`` is overwritten with
    ``(sum_b clip(g_b) + N(0, (sigma C)^2 I)) / normaliser`` where the normaliser is 1 for
    ``loss_reduction="sum"`` and the *expected* batch size ``q N`` for ``"mean"`` (never the
    realised batch size, which depends on the private sampling outcome).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from privgrad.engine.batch import BackwardBatch
from privgrad.errors import PrivacyStateError
from privgrad.privatize.clipping import flat_clip, per_layer_bounds, per_layer_clip


@dataclass
class StepStats:
    """Counts over the physical batches of one logical step (not private: for monitoring only,
    they depend on the sampled batch)."""

    examples: int = 0
    clipped: int = 0
    dropped: int = 0
    backward_passes: int = 0


class ClippedSum:
    """Accumulates ``sum_b clip(g_b)`` per parameter over the backward passes of one step.

    Args:
        params: the parameters privatised (those of the optimizer that require grad).
        max_grad_norm: ``C`` (float), or one bound per parameter for per-layer clipping.
        clipping: ``"flat"`` or ``"per_layer"``.
        sparse_sums: keep embeddings' sums as sparse rows where that is smaller, for
            :func:`noisy_gradients` with a noise source that ``fuses_sums`` (it adds them into
            the noise buffer); every other consumer needs dense sums.
    """

    def __init__(self, params: list[nn.Parameter], max_grad_norm, clipping: str, *,
                 sparse_sums: bool = False):
        self.sparse_sums = sparse_sums
        self.clipping = clipping
        self.max_grad_norm = max_grad_norm
        self.bounds = per_layer_bounds(params, max_grad_norm) if clipping == "per_layer" else None
        self.sums: dict[nn.Parameter, torch.Tensor] = {}
        self.stats = StepStats()

    def add(self, batch: BackwardBatch, params: set) -> None:
        """Clip one backward pass's examples and add their sum. ``params``: those privatised."""
        norms_sq = {p: sq for p, sq in batch.norms_sq.items() if p in params}
        device = next(iter(norms_sq.values())).device if norms_sq else None
        if self.clipping == "flat":
            result = flat_clip(norms_sq, float(self.max_grad_norm), batch.batch_size, device)
        else:
            missing = [tuple(p.shape) for p in norms_sq if p not in self.bounds]
            if missing:  # the engine refuses first, naming them; never invent a bound here
                raise PrivacyStateError(
                    f"per-layer clipping has one bound per parameter, fixed when the guarantee "
                    f"was set; got {len(missing)} parameter(s) without one (shapes "
                    f"{missing[:5]}). Use clipping='flat', or make them trainable before "
                    f"make_private.")
            result = per_layer_clip(norms_sq, self.bounds, batch.batch_size, device)
        keep = None if result.dropped == 0 else result.keep
        sums = batch.weighted_sums(result.weights, keep, sparse=self.sparse_sums)
        for p, s in sums.items():
            if p not in params:
                continue
            acc = _accumulation_dtype(p)
            if s.dtype != acc:
                s = s.to(acc)
            prev = self.sums.get(p)
            if prev is None:
                self.sums[p] = s
            elif prev.is_sparse:  # sparse + sparse stays sparse while smaller than dense
                if s.is_sparse and prev._nnz() + s._nnz() < prev.shape[0]:
                    self.sums[p] = prev + s
                else:
                    self.sums[p] = (s if not s.is_sparse else s.to_dense()).add_(prev)
            else:
                self.sums[p] = prev.add_(s)
        self.stats.examples += batch.batch_size
        self.stats.clipped += result.clipped
        self.stats.dropped += result.dropped
        self.stats.backward_passes += 1

    def reset(self) -> None:
        self.sums = {}
        self.stats = StepStats()


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

    With PyTorch's generator (:class:`~privgrad.privatize.TorchGaussian`) the result is formed
    as ``z + sum / normaliser`` with ``z ~ N(0, (noise_std / normaliser)^2)`` drawn straight
    into the buffer that becomes ``p.grad``: the same distribution, one pass over the parameter
    instead of three, and a sparse sum touches only its rows. The noise of all parameters of
    one dtype and device is one draw (:meth:`TorchGaussian.sample_many`), so the gradients are
    views into one buffer. Other sources (secure mode) add
    the noise to the sum themselves, and the result is divided afterwards.
    """
    out = {}
    if getattr(noise, "fuses_sums", False):
        draws = noise.sample_many([(p.shape, _accumulation_dtype(p), p.device) for p in params],
                                  noise_std / normaliser)
        for p, g in zip(params, draws):
            s = sums.get(p)
            if s is not None:
                g.add_(s, alpha=1.0 / normaliser)
            out[p] = g if g.dtype == p.dtype else g.to(p.dtype)
        return out
    for p in params:
        s = sums.get(p)
        total = s if s is not None else torch.zeros_like(p, dtype=_accumulation_dtype(p))
        total = total.to_dense() if total.is_sparse else total
        g = noise.add_noise(total, noise_std)  # the source adds: secure mode snaps the result
        if normaliser != 1.0:
            g.div_(normaliser)
        out[p] = g if g.dtype == p.dtype else g.to(p.dtype)
    return out


def _accumulation_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 or wider: half-precision parameters get float32 sums and noise."""
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.promote_types(
        p.dtype, torch.float32)
