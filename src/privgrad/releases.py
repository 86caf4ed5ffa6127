"""``PrivacyEngine.release_sum``: statistics released before training, paid from the run's
budget ([`noisy_sum()`][privgrad.privatize.statistics.noisy_sum] draws them; this records them
in the engine's accountant, so that ``make_private_with_epsilon`` calibrates training's noise for
what is left)."""

from __future__ import annotations

import torch

from privgrad.accounting.events import PoissonGaussian
from privgrad.errors import PrivacyStateError
from privgrad.privatize.statistics import noisy_sum

__all__ = ["Releases"]


class Releases:
    """``PrivacyEngine.release_sum``: releases before training, paid from the same budget."""

    def release_sum(self, rows: torch.Tensor, *, max_norm: float, noise_multiplier: float
                    ) -> torch.Tensor:
        """The noisy sum of ``rows`` clipped to ``max_norm``
        ([`noisy_sum()`][privgrad.privatize.statistics.noisy_sum]), drawn from this engine's
        noise source and recorded in its accountant as ``PoissonGaussian(noise_multiplier, 1.0)``.

        Call it before ``make_private``: ``make_private_with_epsilon`` then spends only what is
        left of ``target_epsilon`` on training, and ``get_epsilon()`` reports the total.

        Raises:
            PrivacyStateError: the engine is already attached (training's noise was calibrated
                without this release).
            ConfigError, ConfigTypeError: ``rows``, ``max_norm`` or ``noise_multiplier`` refused
                (then nothing is released or recorded).
        """
        if self._module is not None:
            raise PrivacyStateError(
                "release_sum must come before make_private; got a call while the engine is "
                "attached, whose noise was calibrated without it. Release the statistics first, "
                "or use a second PrivacyEngine and compose its accountant's event yourself.")
        total = noisy_sum(rows, max_norm=max_norm, noise_multiplier=noise_multiplier,
                          noise=self.noise)
        self.accountant.compose(PoissonGaussian(float(noise_multiplier), 1.0))
        return total
