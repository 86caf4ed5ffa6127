"""``PrivacyEngine.release_sum``: statistics released before training, paid from the run's
budget ([`noisy_sum()`][privgrad.privatize.statistics.noisy_sum] draws them; this records them
in the engine's accountant, so that ``make_private_with_epsilon`` calibrates training's noise for
what is left)."""

from __future__ import annotations

import torch

from privgrad.accounting.events import PoissonGaussian
from privgrad.distributed.context import in_process_group
from privgrad.errors import PrivacyStateError
from privgrad.privatize.statistics import noisy_sum
from privgrad.sampling.users import user_index

__all__ = ["Releases"]


class Releases:
    """``PrivacyEngine.release_sum``: releases before training, paid from the same budget."""

    def release_sum(self, rows: torch.Tensor, *, max_norm: float, noise_multiplier: float,
                    user_ids=None) -> torch.Tensor:
        """The noisy sum of ``rows`` clipped to ``max_norm``
        ([`noisy_sum()`][privgrad.privatize.statistics.noisy_sum]), drawn from this engine's
        noise source and recorded in its accountant as ``PoissonGaussian(noise_multiplier, 1.0)``.

        Call it before ``make_private``: ``make_private_with_epsilon`` then spends only what is
        left of ``target_epsilon`` on training, and ``get_epsilon()`` reports the total.

        ``user_ids`` (one id per row) makes the release user-level: each user's rows are summed
        first and the sum is clipped, so one user moves the release by at most ``max_norm``. The
        training run must protect the same unit: ``make_private`` refuses ``privacy_unit="user"``
        after an example-level release (a user with many rows would move it by many times
        ``max_norm``), and the reverse.

        Raises:
            PrivacyStateError: the engine is already attached (training's noise was calibrated
                without this release), or the process is in a ``torch.distributed`` job.
            ConfigError, ConfigTypeError: ``rows``, ``max_norm``, ``noise_multiplier`` or
                ``user_ids`` (one hashable id per row) refused
                (then nothing is released or recorded).
        """
        if self._module is not None:
            raise PrivacyStateError(
                "release_sum must come before make_private; got a call while the engine is "
                "attached, whose noise was calibrated without it. Release the statistics first, "
                "or use a second PrivacyEngine and compose its accountant's event yourself.")
        if in_process_group():
            raise PrivacyStateError(
                "release_sum runs in one process; got a call in a torch.distributed job, where "
                "each rank would release its own noisy copy while each accountant records one. "
                "Release the statistics in one process before the job (or on rank 0 before "
                "init_process_group), send the result to every rank, and record it on each "
                "rank with engine.accountant.compose(PoissonGaussian(noise_multiplier, 1.0)).")
        if user_ids is not None and isinstance(rows, torch.Tensor) and rows.dim() == 2:
            owner, _ = user_index(user_ids, len(rows))
            owner = torch.as_tensor(owner, device=rows.device)
            rows = rows.new_zeros(int(owner.max()) + 1 if len(owner) else 0,
                                  rows.shape[1]).index_add_(0, owner, rows)
        total = noisy_sum(rows, max_norm=max_norm, noise_multiplier=noise_multiplier,
                          noise=self.noise)
        self.accountant.compose(PoissonGaussian(float(noise_multiplier), 1.0))
        self._release_units = self._units_released() | {"example" if user_ids is None else "user"}
        return total

    def _units_released(self) -> frozenset:
        return getattr(self, "_release_units", frozenset())

    def _refuse_other_unit(self, unit: str) -> None:
        """Raise if a release protected another unit than the run about to start."""
        other = self._units_released() - {unit}
        if other:
            raise PrivacyStateError(
                f"statistics released before training must protect the run's unit; got a "
                f"release at the {sorted(other)[0]} level and privacy_unit={unit!r}. Pass "
                f"user_ids= to release_sum for a user-level run (each user's rows summed, then "
                f"clipped), none for an example-level one; a new PrivacyEngine starts over.")
