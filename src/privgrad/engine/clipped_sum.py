"""The clipped sum of one logical step, formed by the engine: clip factors from the per-sample
norms (``privgrad.privatize.clipping``), then the weighted sums of per-sample gradients
(``weighted_sums()``), added up over the backward passes
of one logical step (virtual batches). The result is handed to the release
(``privgrad.privatize.noisy_gradients()``) as plain tensors.

Privacy:
    Each example is clipped once, in the backward pass that saw it; the bounds are fixed when
    the guarantee is set and never invented for a parameter that has none (refused instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from privgrad._precision import accumulation_dtype
from privgrad.engine.batch import BackwardBatch
from privgrad.errors import PrivacyStateError
from privgrad.privatize.clipping import automatic_clip, flat_clip, per_layer_clip

__all__ = ["ClippedSum", "StepStats"]


@dataclass
class StepStats:
    """Counts over the physical batches of one logical step (not private: for monitoring only,
    they depend on the sampled batch)."""

    examples: int = 0
    clipped: int = 0
    dropped: int = 0
    backward_passes: int = 0
    within: int = 0  # examples whose norm was at most the (flat) bound: adaptive clipping's count
    #: per-layer bounds: that count per parameter (a parameter no example reached: all within)
    within_by_param: dict = field(default_factory=dict)


class ClippedSum:
    """Accumulates ``sum_b clip(g_b)`` per parameter over the backward passes of one step.

    Args:
        bounds: ``C`` (flat clipping), or ``{parameter: C_k}`` (per-layer clipping), as
            ``privgrad.settings.PrivacySettings.bounds()`` fixed them. Adaptive clipping
            sets a new flat ``bounds`` between steps.
        gamma: automatic clipping's stability constant: each example is scaled by
            ``C / (||g|| + gamma)`` (``bounds`` is then ``C``); ``None`` for clipping.
        sparse_sums: keep embeddings' sums as sparse rows where that is smaller, for a release
            whose noise source ``fuses_sums`` (it adds them into the noise buffer); every other
            consumer needs dense sums.
        shard: sharded (FSDP) training: ``(batch, weights, keep, params) -> {parameter: this rank's
            shard of the summed clipped sum}`` (``privgrad.distributed.fsdp``); it forms and
            reduces one parameter's full-shape sum at a time, so no full-model sum exists.
    """

    def __init__(self, bounds: float | dict[nn.Parameter, float], *, sparse_sums: bool = False,
                 gamma: float | None = None, shard=None):
        self.sparse_sums = sparse_sums
        self.shard = shard
        self.bounds = bounds
        self.gamma = gamma
        self.sums: dict[nn.Parameter, torch.Tensor] = {}
        self.stats = StepStats()

    def add(self, batch: BackwardBatch, params: set, real: torch.Tensor | None = None) -> None:
        """Clip one backward pass's examples and add their sum. ``params``: those privatised;
        ``real``: ``(B,)`` bool, False for padding rows (``privgrad.engine.padding``), which are
        dropped before anything is summed or counted."""
        norms_sq = {p: sq for p, sq in batch.norms_sq.items() if p in params}
        device = next(iter(norms_sq.values())).device if norms_sq else None
        pads = 0
        if real is not None:  # padding: norm 0 (never clipped, never non-finite), then dropped
            pads = int(real.numel() - real.sum())
            norms_sq = {p: torch.where(real, sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
                        for p, sq in norms_sq.items()}
        if self.gamma is not None:
            result = automatic_clip(norms_sq, self.bounds, self.gamma, batch.batch_size, device)
        elif not isinstance(self.bounds, dict):
            result = flat_clip(norms_sq, self.bounds, batch.batch_size, device)
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
        if pads:
            keep = real if keep is None else keep & real
        sums = (batch.weighted_sums(result.weights, keep, sparse=self.sparse_sums)
                if self.shard is None else self.shard(batch, result.weights, keep, params))
        for p, s in sums.items():
            if p not in params:
                continue
            acc = accumulation_dtype(p.dtype)
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
        self.stats.examples += batch.batch_size - pads
        self.stats.clipped += result.clipped
        self.stats.dropped += result.dropped
        if isinstance(result.within, dict):  # (a padding row, of norm 0, counted as within)
            kept = batch.batch_size - result.dropped
            for p in self.bounds:
                self.stats.within_by_param[p] = (self.stats.within_by_param.get(p, 0)
                                                 + result.within.get(p, kept) - pads)
        else:
            self.stats.within += result.within - pads
        self.stats.backward_passes += 1

    def reset(self) -> None:
        self.sums = {}
        self.stats = StepStats()
