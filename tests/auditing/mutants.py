"""Deliberately broken variants of privgrad's real code paths, applied with ``monkeypatch``.

Each takes pytest's ``monkeypatch`` fixture and patches one piece of the mechanism the audit must
catch; the patch is undone when the test ends.
"""

from __future__ import annotations

import numpy as np
import torch

from privgrad.privatize import clipping
from privgrad.privatize.noise import TorchGaussian
from privgrad.sampling.poisson import PoissonSampler, steps_per_epoch


def noise_halved(monkeypatch) -> None:
    """The Gaussian noise is drawn with half the standard deviation."""
    original = TorchGaussian.fill
    monkeypatch.setattr(TorchGaussian, "fill",
                        lambda self, out, std: original(self, out, 0.5 * std))


def clipping_off(monkeypatch) -> None:
    """Flat clipping keeps every finite per-sample gradient whole (factor 1)."""
    monkeypatch.setattr(clipping, "_factor", lambda norm, bound, **_: torch.where(
        torch.isfinite(norm), torch.ones_like(norm), torch.zeros_like(norm)))


def bound_sqrt2(monkeypatch) -> None:
    """Flat clipping clips to sqrt(2) C instead of C (a sensitivity the accountant never saw)."""
    original = clipping._factor
    monkeypatch.setattr(clipping, "_factor",
                        lambda norm, bound, **kw: original(norm, bound * 2**0.5, **kw))


def shuffling(monkeypatch) -> None:
    """Fixed-size batches of a fresh permutation every epoch instead of Poisson sampling."""

    def sample(self: PoissonSampler) -> np.ndarray:
        queue = self.__dict__.setdefault("_mutant_queue", [])
        rng = self.__dict__.setdefault("_mutant_rng", np.random.default_rng(0))
        if not queue:
            perm = rng.permutation(self.num_records)
            queue.extend(np.array_split(perm, steps_per_epoch(self.sample_rate)))
        return np.sort(queue.pop(0)).astype(np.int64)

    monkeypatch.setattr(PoissonSampler, "sample", sample)


MUTANTS = {"noise_halved": noise_halved, "clipping_off": clipping_off, "bound_sqrt2": bound_sqrt2,
           "shuffling": shuffling}
