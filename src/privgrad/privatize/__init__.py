"""The release of DP-SGD, on plain tensors: clip factors from squared norms (``clipping``), the
Gaussian noise (``noise``, ``secure``; any [`NoiseSource`][privgrad.privatize.source.NoiseSource]),
and the clipped sum plus noise, normalised, for each parameter (``step``). Nothing here knows about
captures, hooks, optimizers or
loaders: the engine forms the clipped sums and hands them over."""

from __future__ import annotations

from privgrad.privatize.clipping import CLIPPING, ClipResult, automatic_clip, flat_clip, per_layer_clip
from privgrad.privatize.noise import TorchGaussian
from privgrad.privatize.source import NoiseSource, check_source, noise_source
from privgrad.privatize.step import noisy_gradients

__all__ = ["CLIPPING", "ClipResult", "NoiseSource", "TorchGaussian", "check_source",
           "automatic_clip", "flat_clip", "noise_source", "noisy_gradients", "per_layer_clip"]
