"""A private release of statistics before training: the noisy sum of per-example rows, each
clipped to a norm (the Gaussian mechanism). ``privgrad.releases`` records it in the engine's
accountant.

Training often wants a few numbers about the private data first: the mean and spread of each
input feature to normalise it (Tramèr & Boneh's ScatterNet models normalise their features with
noisy per-channel statistics), class counts, a histogram. Each is a sum over examples of a
per-example vector; [`PrivacyEngine.release_sum()`][privgrad.PrivacyEngine.release_sum] clips
every vector to ``max_norm``, sums them, adds ``N(0, (noise_multiplier * max_norm)^2)`` to every
coordinate, and composes one Gaussian step (sample rate 1) into the engine's accountant, so that
``make_private_with_epsilon`` afterwards calibrates training's noise for what is left of the
budget (``target_epsilon`` is the total).

Privacy:
    Under add/remove-one-example adjacency the clipped sum moves by at most ``max_norm`` in L2,
    so the release is the Gaussian mechanism with ``noise_multiplier``: exactly a DP-SGD step
    that samples every example (``PoissonGaussian(noise_multiplier, 1.0)``). Means need a count:
    put a constant coordinate in every row and divide the noisy sums by its noisy sum (the
    data set's size is then private too). ``max_norm`` must be chosen without looking at the
    data (a quantile of the rows' norms is itself private information).
"""

from __future__ import annotations

import torch

from privgrad import _validate
from privgrad.errors import ConfigError, ConfigTypeError
from privgrad.privatize.clipping import _factor

__all__ = ["noisy_sum"]


def noisy_sum(rows: torch.Tensor, *, max_norm: float, noise_multiplier: float, noise
              ) -> torch.Tensor:
    """``sum_i rows[i] * min(1, max_norm / ||rows[i]||) + N(0, (noise_multiplier max_norm)^2)``.

    Args:
        rows: ``(n, d)`` floating tensor, one row per privacy unit (an example), finite.
        max_norm: the L2 bound each row is clipped to, > 0.
        noise_multiplier: the noise's standard deviation over ``max_norm``, > 0.
        noise: the [`NoiseSource`][privgrad.privatize.source.NoiseSource] to draw from.

    Returns:
        ``(d,)`` on ``rows``' device, in float32 for half-precision rows, else in their dtype
        (float64 from a secure source, whose lattice rounding must not be undone).
    """
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point() or rows.dim() != 2:
        raise ConfigTypeError(
            f"rows must be a floating-point tensor of shape (examples, features); got "
            f"rows={type(rows).__name__ if not isinstance(rows, torch.Tensor) else rows.dtype}"
            f"{'' if not isinstance(rows, torch.Tensor) else tuple(rows.shape)}. Stack one "
            f"row per example, e.g. torch.stack([features(x) for x in data]).")
    bound = _validate.positive("max_norm", max_norm, "Pass the L2 bound of one example's row, "
                               "chosen without looking at the data, e.g. 1.0.")
    sigma = _validate.positive("noise_multiplier", noise_multiplier,
                               "Pass the noise std over max_norm, e.g. 8.0 (a release without "
                               "noise is not private).")
    work = rows.detach().to(torch.promote_types(rows.dtype, torch.float32))
    bad = int((~torch.isfinite(work).all(1)).sum())
    if bad:
        raise ConfigError(
            f"rows must be finite; got {bad} row(s) with NaN or inf. Fix the features before "
            f"releasing them (a clipped NaN is still NaN).")
    # ||r|| as max|r| * ||r / max|r|||: a row of finite but huge entries is clipped to the
    # bound like any other, where its plain norm would overflow to inf and drop it
    peak = work.abs().amax(1).clamp_min(torch.finfo(work.dtype).tiny)
    norm = peak * (work / peak[:, None]).norm(dim=1)
    return noise.add_noise(_factor(norm, bound) @ work, sigma * bound)
