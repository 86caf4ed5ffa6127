"""What a noise source is: the interface the release (``noisy_gradients()``)
and the engine use, and nothing else.

A source draws Gaussian noise for the release of one logical step. Two kinds ship:
[`TorchGaussian`][privgrad.privatize.noise.TorchGaussian] (PyTorch's generators, reproducible, fast;
it *fuses* the sums: it draws the noise straight into the gradient buffers and adds the clipped sums
there) and ``SecureGaussian`` (secure mode: a CSPRNG and a release snapped to a lattice; it adds the
noise to the sum itself). ``PrivacyEngine(noise=...)`` takes any object with these members; a source
with state across steps (the correlated-noise mechanisms of the matrix-factorization issue) keeps it
in [`NoiseSource.state_dict()`][privgrad.privatize.source.NoiseSource.state_dict], which every
resume path saves and restores.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from privgrad.errors import ConfigError, ConfigTypeError

__all__ = ["NoiseSource", "check_source", "noise_source"]


@runtime_checkable
class NoiseSource(Protocol):
    """The members a noise source has.

    Attributes:
        secure: whether the source resists an attacker who sees exact floating-point releases
            (recorded in checkpoints; secure mode requires it).
        fuses_sums: whether the release may call
            [`sample_many()`][privgrad.privatize.source.NoiseSource.sample_many] and add the clipped
            sums into its buffers (``True``), or must hand each sum to
            [`add_noise()`][privgrad.privatize.source.NoiseSource.add_noise] (``False``).

    Privacy:
        A source must draw every value independently of the data and of every earlier draw of
        the run (a resumed run continues from
        [`state_dict()`][privgrad.privatize.source.NoiseSource.state_dict], never from the
        beginning).
    """

    secure: bool
    fuses_sums: bool

    def add_noise(self, total: torch.Tensor, std: float) -> torch.Tensor:
        """``total + N(0, std^2)`` per coordinate, as a new tensor."""

    def sample_many(self, likes: list, std: float) -> list[torch.Tensor]:
        """New ``N(0, std^2)`` tensors, one per ``(shape, dtype, device)`` (used when
        ``fuses_sums``)."""

    def seeded(self, seed: int) -> NoiseSource:
        """This source for one run, seeded from ``seed`` (drawn at ``make_private`` from
        PyTorch's generator); a source that takes no seed (secure) returns itself."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the noise (plain data and tensors)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from [`state_dict()`][privgrad.privatize.source.NoiseSource.state_dict]'s
        output."""


_MEMBERS = ("secure", "fuses_sums", "add_noise", "sample_many", "seeded", "state_dict",
            "load_state_dict")


def check_source(noise: object) -> NoiseSource:
    """``noise`` if it has every member of [`NoiseSource`][privgrad.privatize.source.NoiseSource],
    else a ``ConfigTypeError`` naming the missing ones."""
    missing = [m for m in _MEMBERS if not hasattr(noise, m)]
    if missing:
        raise ConfigTypeError(
            f"noise must be a noise source (privgrad.privatize.NoiseSource); got "
            f"noise={type(noise).__name__}, without {', '.join(missing)}. Pass "
            f"privgrad.privatize.TorchGaussian() or SecureGaussian(), or implement those "
            f"members (docs/extending.md).")
    return noise


def noise_source(noise: object | None, secure_mode: bool) -> NoiseSource:
    """The source a [`PrivacyEngine`][privgrad.PrivacyEngine] uses: ``noise`` (checked), secure
    mode's ``SecureGaussian``, or the default
    [`TorchGaussian`][privgrad.privatize.noise.TorchGaussian]."""
    if noise is not None and secure_mode:
        raise ConfigError(
            f"secure_mode=True chooses its own noise source; got noise={type(noise).__name__} "
            f"as well. Pass one of them.")
    if secure_mode:
        from privgrad.privatize.secure import SecureGaussian

        return SecureGaussian()
    if noise is None:
        from privgrad.privatize.noise import TorchGaussian

        return TorchGaussian()
    return check_source(noise)
