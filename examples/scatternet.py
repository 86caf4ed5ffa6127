"""ScatterNet features for 28x28 images (Tramèr & Boneh, ICLR 2021), computed once and cached.

A scattering transform (Mallat; Oyallon & Mallat) is a fixed, hand-designed cascade of wavelet
filters and moduli: no parameter is learned, so applying it to private images is a per-example
map that costs no privacy. With ``J=2`` and 8 angles on a 28x28 image it gives 81 channels of
7x7 (1 + 8J + 64 J(J-1)/2 = 81), 3,969 numbers an image.

Each example's channels are then group-normalised (``F.group_norm`` with no learned scale, the
paper's 27 groups for the linear model): a per-example map too, so also free.

Needs ``kymatio`` (``pip install -e ".[examples]"`` in a clone). Only the 2D frontend is imported:
``kymatio.torch`` also imports the 3D scattering, which asks scipy for ``sph_harm``, removed
from scipy 1.17; the 2D transform never needs it.

``cnn()`` is the small CNN that Tramèr & Boneh train on these features ("ScatterNet + CNN",
their models.py for MNIST and Fashion-MNIST, default size): two 3x3 convolutions (16 channels
with stride 2, so 7x7 -> 4x4, then 32), tanh after each, and a 512 -> 32 -> 10 tanh classifier
(33,066 parameters). It reads the flattened features and folds them back into 81 x 7 x 7.

Features are cached as ``.npy`` files under ``--cache-dir`` (default ``~/.cache/privgrad``),
keyed by the data set, split, image count and view (``flip`` is the mirrored image), so a run
that is repeated, or sweeps epsilon, computes them once (84 s for the 60,000 training images
on the 2-core VM when it was fairly quiet, ten minutes when it was shared eight ways; run with
``--threads 1`` on a busy machine: two threads there made the transform 8x slower).
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHANNELS, SIDE = 81, 7  # J=2, L=8 on 28x28 images
DEFAULT_CACHE = Path.home() / ".cache" / "privgrad"


@functools.cache
def scattering():
    """The J=2 scattering transform of a 28x28 image (kymatio's 2D torch frontend); built once
    (its filter bank takes seconds)."""
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as e:
        raise SystemExit("ScatterNet features need kymatio; got none installed. "
                         "pip install -e '.[examples]' in a clone of privgrad") from e
    return ScatteringTorch2D(J=2, shape=(28, 28), L=8)


def features(images: torch.Tensor, key: str, cache_dir: Path, flip: bool = False) -> torch.Tensor:
    """Scattering coefficients ``(n, 81, 7, 7)`` of ``images`` ``(n, 1, 28, 28)``, cached.

    Args:
        images: pixels in [0, 1].
        key: names the images in the cache (data set and split); the image count and a hash of
            the first and last images are added, so a subset never reads another's file.
        cache_dir: where the ``.npy`` files live; created if missing.
        flip: mirror the images left to right first (an augmented view).
    """
    digest = hashlib.sha1(images[:1].numpy().tobytes() + images[-1:].numpy().tobytes()).hexdigest()
    name = f"{key}_{len(images)}_{digest[:8]}{'_flip' if flip else ''}.npy"
    path = Path(cache_dir) / "scatter" / name
    if path.exists():
        return torch.from_numpy(np.load(path))
    start, transform, out = time.perf_counter(), scattering(), []
    source = images.flip(-1).contiguous() if flip else images
    with torch.no_grad():
        for chunk in source.split(1000):
            out.append(transform(chunk).reshape(len(chunk), CHANNELS, SIDE, SIDE))
    coefficients = torch.cat(out) if out else torch.zeros(0, CHANNELS, SIDE, SIDE)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, coefficients.numpy())
    print(f"scattering features of {len(images)} images ({key}{', flipped' if flip else ''}) "
          f"in {time.perf_counter() - start:.0f} s, cached in {path}", flush=True)
    return coefficients


def group_normalise(coefficients: torch.Tensor, groups: int) -> torch.Tensor:
    """Each example's channels normalised in ``groups`` groups (no learned scale): per example,
    so computing it on private data costs no privacy. ``groups=0`` leaves them as they are."""
    if groups == 0:
        return coefficients
    return F.group_norm(coefficients, groups)


def cnn(classes: int = 10) -> nn.Module:
    """Tramèr & Boneh's ScatterNet + CNN for 28x28 images, on flattened ``(B, 3969)`` features
    (group-normalised already: the model has no normalisation of its own). Every trainable layer
    is a ``Conv2d`` or a ``Linear``, which privgrad's rules cover."""
    return nn.Sequential(
        nn.Unflatten(1, (CHANNELS, SIDE, SIDE)),
        nn.Conv2d(CHANNELS, 16, 3, stride=2, padding=1), nn.Tanh(),  # 7x7 -> 4x4
        nn.Conv2d(16, 32, 3, stride=1, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, classes),
    )


def private_statistics(engine, features: torch.Tensor, groups: int, noise_multiplier: float,
                       bound: float | None = None):
    """Each channel's mean and variance over the training examples, released with
    ``engine.release_sum`` (the Gaussian mechanism, paid from the run's budget): Tramèr &
    Boneh's private "data normalisation", with a noisy count instead of a public one.

    Each example contributes one row: its 81 channel means, its 81 channel mean squares (over
    positions and views) and a constant ``count``, clipped to ``bound``. With group-normalised
    features (``groups`` > 0, ``k = 81 / groups`` channels a group) every row is within
    ``sqrt(81 + 81 k + count^2)`` with ``count = 9`` (a group's mean squares add up to at most
    ``k``), so that default bound clips nothing and was fixed without looking at the data. Raw
    features (``groups=0``) have no such bound: pass one (``count`` is then half of it); a
    clipped row's count is scaled with it, so the means stay weighted means.

    Returns ``(mean, var)``, each ``(81,)``; ``engine=None``: the exact ones (non-private runs).
    """
    if bound is None:
        if not groups:
            raise SystemExit("--data-norm on raw features (--groups 0) needs --data-norm-bound: "
                             "the rows have no bound known in advance")
        count = 9.0
        bound = (CHANNELS + CHANNELS * CHANNELS // groups + count ** 2) ** 0.5
    else:
        count = bound / 2
    f = features.reshape(len(features), -1, CHANNELS, SIDE * SIDE).double()  # (n, views, 81, 49)
    rows = torch.cat([f.mean((1, 3)), f.pow(2).mean((1, 3)),
                      torch.full((len(f), 1), count, dtype=f.dtype)], 1)
    total = (rows.sum(0) if engine is None else  # not private: the exact statistics
             engine.release_sum(rows, max_norm=bound, noise_multiplier=noise_multiplier))
    n = total[-1] / count  # the noisy number of examples (clipping would scale it too)
    mean, square = total[:CHANNELS] / n, total[CHANNELS:2 * CHANNELS] / n
    return mean, (square - mean ** 2).clamp_min(0.0)


def standardise(features: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``(features - mean) / sqrt(var + 1e-5)`` per channel, for flattened features ``(n, 3969)``
    or ``(n, views, 3969)`` (post-processing of the released statistics: free)."""
    shape = features.shape
    f = features.reshape(*shape[:-1], CHANNELS, SIDE * SIDE)
    out = (f - mean[:, None].to(f.dtype)) / (var[:, None].to(f.dtype) + 1e-5).sqrt()
    return out.reshape(shape)
