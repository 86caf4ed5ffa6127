"""Opacus's ``DistributedDPOptimizer``: hand-assembled DP-SGD over a process group.

Each rank clips its own rows; the clipped sums are added across ranks; rank 0 alone adds the
noise; every rank applies the same release. The collective calls are privgrad's
(``privgrad.distributed.DataParallel``: a reduce to rank 0 and a broadcast). Opacus adds the
noise on rank 0 *before* an all-reduce; the result is the same release.
"""

from __future__ import annotations

import torch

from privgrad.distributed import data_parallel
from privgrad.errors import ConfigError
from privgrad.opacus.optimizers.optimizer import (
    DPOptimizer,
    _check_processed_flag,
    _mark_as_processed,
)
from privgrad.privatize import noisy_gradients

__all__ = ["DistributedDPOptimizer"]


class DistributedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` for data-parallel training (see the module docstring).

    Args:
        expected_batch_size: the expected batch size *per rank* (Opacus's meaning); the
            release is divided by it times the world size (``loss_reduction="mean"``).
        Others: as ``DPOptimizer``.

    Privacy:
        One release per step: ``(sum over all ranks' rows of clip_C(g) + N(0, (sigma C)^2 I))
        / normaliser``, the noise drawn once, by rank 0. The rows of all ranks together must be
        one Poisson sample (``DPDataLoader(..., distributed=True)``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, **kwargs):
        super().__init__(optimizer, **kwargs)
        ranks = data_parallel(None, torch.nn.Module(), True)
        if ranks is None:
            raise ConfigError(
                "DistributedDPOptimizer needs an initialised torch.distributed process group; "
                "got torch.distributed.is_initialized()=False. Call "
                "torch.distributed.init_process_group first, or use DPOptimizer.")
        self._ranks = ranks
        self.rank, self.world_size = ranks.rank, ranks.world_size

    def add_noise(self) -> None:
        """The ranks' clipped sums, added on rank 0, plus rank 0's noise, given to every rank."""
        params = self.params
        local = {p: p.summed_grad for p in params}
        _check_processed_flag(list(local.values()))
        total = self._ranks.reduce_sums(local, params)
        noise_std = self._ranks.noise_share(self.noise_multiplier * self.max_grad_norm)
        grads = noisy_gradients(params, total, noise_std=noise_std, normaliser=1.0,
                                noise=self._noise)
        grads = self._ranks.broadcast_release(grads)
        for p in params:
            p.grad = grads[p].view_as(p).clone()
        _mark_as_processed(list(local.values()))

    def scale_grad(self) -> None:
        """Divide by the job's expected batch size (per-rank size times world size)."""
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size * self.world_size
