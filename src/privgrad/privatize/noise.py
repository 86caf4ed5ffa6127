"""The Gaussian noise of DP-SGD, drawn once per logical step for each trainable parameter.

Privacy:
    The default source draws from PyTorch's generator for the parameter's device, so runs are
    reproducible after ``torch.manual_seed`` (as everywhere in PyTorch). It is *not* a secure
    source: floating-point Gaussian samplers leak through the low bits of their output (Mironov
    2012), and PyTorch's generators are not cryptographic. Use secure mode for a deployment that
    must resist such an attacker.
"""

from __future__ import annotations

import torch


class TorchGaussian:
    """Noise from PyTorch's default generator on the tensor's device (not secure)."""

    secure = False

    def sample(self, like: torch.Tensor, std: float) -> torch.Tensor:
        """A new tensor shaped like ``like`` (same dtype and device) of ``N(0, std^2)`` draws."""
        out = torch.empty_like(like)
        return out.normal_(0.0, std) if std > 0 else out.zero_()

    def add_noise(self, total: torch.Tensor, std: float) -> torch.Tensor:
        """``total + N(0, std^2)`` as a new tensor (the noise is drawn first, then added).

        Every noise source has this method: the engine hands it the clipped sum, so that a
        secure source can control how the addition is rounded
        (:class:`~privgrad.privatize.secure.SecureGaussian`).
        """
        return self.sample(total, std).add_(total)
