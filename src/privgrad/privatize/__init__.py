"""The private step: clip factors (``clipping``), noise (``noise``), and the clipped sum, noise
and normalisation written into ``p.grad`` (``step``)."""

from __future__ import annotations

from torch import nn

from privgrad import _validate
from privgrad.engine.batch import BackwardBatch
from privgrad.privatize.clipping import CLIPPING, ClipResult, flat_clip, per_layer_clip
from privgrad.privatize.noise import TorchGaussian
from privgrad.privatize.step import ClippedSum, StepStats, noisy_gradients

__all__ = ["CLIPPING", "ClipResult", "ClippedSum", "StepStats", "TorchGaussian", "flat_clip",
           "noisy_gradients", "per_layer_clip", "private_step"]


def private_step(batch: BackwardBatch | list[BackwardBatch], params: list[nn.Parameter], *,
                 noise_multiplier: float, max_grad_norm: float, clipping: str = "flat",
                 normaliser: float = 1.0, noise=None) -> StepStats:
    """Clip the recorded examples, add them up, add ``N(0, (sigma C)^2)`` once, divide by
    ``normaliser`` and write the result to ``p.grad`` for every parameter in ``params``.

    Privacy:
        One call is one release of the subsampled Gaussian mechanism with the given
        ``noise_multiplier``; the caller must account for it (e.g. ``RDPAccountant.step``) and
        must pass a ``normaliser`` that does not depend on the private data (the expected batch
        size, not the realised one).
    """
    sigma = _validate.finite_nonnegative(
        "noise_multiplier", noise_multiplier, "Pass the noise standard deviation relative to "
        "max_grad_norm, e.g. 1.0.")
    c = _validate.positive("max_grad_norm", max_grad_norm, "Pass the per-sample L2 clipping "
                           "bound, e.g. 1.0.")
    _validate.choice("clipping", clipping, CLIPPING)
    noise = noise or TorchGaussian()
    clipped = ClippedSum(params, c, clipping, sparse_sums=getattr(noise, "fuses_sums", False))
    for b in batch if isinstance(batch, list) else [batch]:
        clipped.add(b, set(params))
    grads = noisy_gradients(params, clipped.sums, noise_std=sigma * c, normaliser=normaliser,
                            noise=noise)
    for p in params:
        p.grad = grads[p]
    return clipped.stats
