"""The settings of a private run and the checks of its arguments.

:class:`PrivacySettings` holds what determines the guarantee (changing any of it changes
epsilon), :class:`PerformanceSettings` what determines speed and memory only. The functions below
are pure checks of ``make_private``'s arguments: each validates one value once, in the one error
format of :mod:`privgrad._validate`, before anything is attached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from privgrad import _validate
from privgrad.errors import ConfigError

class PrivacyWarning(UserWarning):
    """A setting is allowed but weakens or misdescribes the privacy guarantee."""


@dataclass(frozen=True)
class PrivacySettings:
    """What determines the guarantee. Changing any of these changes epsilon."""

    noise_multiplier: float
    max_grad_norm: float | tuple
    clipping: str
    sample_rate: float
    expected_batch_size: float
    loss_reduction: str
    poisson_sampling: bool

    @property
    def total_bound(self) -> float:
        """``C``: the flat bound, or the root-sum-of-squares of per-layer bounds."""
        if isinstance(self.max_grad_norm, tuple):
            return math.sqrt(sum(c * c for c in self.max_grad_norm))
        return float(self.max_grad_norm)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.total_bound

    @property
    def normaliser(self) -> float:
        return self.expected_batch_size if self.loss_reduction == "mean" else 1.0


@dataclass(frozen=True)
class PerformanceSettings:
    """What determines speed and memory only. Changing these never changes epsilon or the
    distribution of the update."""

    grad_sample_mode: str = "auto"



# -- argument checks (pure functions of the arguments) ----------------------------------------
def privatised(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters that require grad, in order, without repeats."""
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p not in seen:
                seen.add(p)
                out.append(p)
    return out


def check_bound(max_grad_norm, clipping: str, num_params: int):
    fix = "Pass the per-sample L2 clipping bound, e.g. 1.0."
    if isinstance(max_grad_norm, Sequence) and not isinstance(max_grad_norm, str):
        if clipping != "per_layer":
            raise _validate.fail("a list of bounds needs clipping='per_layer'", "max_grad_norm",
                                 max_grad_norm, "Pass one float, or clipping='per_layer'.")
        bounds = tuple(_validate.positive("max_grad_norm", c, fix) for c in max_grad_norm)
        if len(bounds) != num_params:
            raise _validate.fail(
                f"per-layer bounds must number the optimizer's {num_params} trainable "
                f"parameters", "max_grad_norm", max_grad_norm,
                "Pass one bound per parameter (optimizer order), or one float to split equally.")
        return bounds
    return _validate.positive("max_grad_norm", max_grad_norm, fix)


def dataset_size(data_loader: DataLoader, poisson_sampling: bool, sample_rate,
                  expected_batch_size) -> int | None:
    """``len(data_loader.dataset)``; ``None`` for a data set without a length when nothing
    needs the size (Poisson sampling off, and ``sample_rate`` and ``expected_batch_size``
    given)."""
    try:
        n = len(data_loader.dataset)
    except TypeError as e:
        if not poisson_sampling and None not in (sample_rate, expected_batch_size):
            return None
        raise ConfigError(
            f"the data set must have a length; got data_loader.dataset="
            f"{type(data_loader.dataset).__name__} without __len__. Use a map-style Dataset, "
            f"or pass poisson_sampling=False with sample_rate= and expected_batch_size= (the "
            f"accounting then assumes Poisson sampling at that rate).") from e
    if n == 0:
        raise _validate.fail("the data set must not be empty", "len(data_loader.dataset)", n,
                             "Check the data loading code.")
    return n


def sampling_rate(data_loader, n: int, sample_rate, expected_batch_size, loss_reduction: str,
                   poisson: bool) -> tuple[float, float]:
    """``(q, expected batch size)``, from the loader (size public) or given (size private)."""
    if sample_rate is not None or expected_batch_size is not None:
        if sample_rate is None or (expected_batch_size is None and loss_reduction == "mean"):
            raise _validate.fail(
                "sample_rate and expected_batch_size go together (they declare the data set's "
                "size private)", "sample_rate, expected_batch_size",
                (sample_rate, expected_batch_size), "Pass both, or neither.")
        q = _validate.unit_interval_right_closed("sample_rate", sample_rate,
                                                 "Pass the per-step inclusion probability.")
        expected = (_validate.positive("expected_batch_size", expected_batch_size,
                                       "Pass the batch size you expect on average.")
                    if expected_batch_size is not None else q * n)
        return q, expected
    batch_size = data_loader.batch_size
    if batch_size is None:
        raise _validate.fail(
            "the data loader must have a batch_size", "data_loader.batch_size", None,
            "Build it with DataLoader(dataset, batch_size=...), or pass sample_rate and "
            "expected_batch_size.")
    if batch_size > n:
        raise _validate.fail(
            f"batch_size must be at most the data set's size ({n})", "batch_size", batch_size,
            f"Use a batch size <= {n}.")
    return batch_size / n, float(batch_size)


def check_ownership(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer parameters must belong to the module, and trainable module parameters must be
    in the optimizer (their autograd gradients would otherwise sit unprivatised in ``.grad``)."""
    owned = {p: name for name, p in module.named_parameters()}
    in_optimizer = {p for g in optimizer.param_groups for p in g["params"]}
    stray = [p for p in in_optimizer if p not in owned]
    if stray:
        shapes = ", ".join(str(tuple(p.shape)) for p in stray[:5])
        raise ConfigError(
            f"every optimizer parameter must belong to the module; got {len(stray)} that do not "
            f"(shapes {shapes}). Build the optimizer from module.parameters().")
    left_out = [name for p, name in owned.items() if p.requires_grad and p not in in_optimizer]
    if left_out:
        raise ConfigError(
            f"every trainable module parameter must be in the optimizer; got "
            f"{', '.join(left_out[:5])} left out. Add them to the optimizer or freeze them "
            f"(requires_grad_(False)).")


def warn_large_delta(delta: float, n: int, name: str) -> None:
    if delta >= 1.0 / n:
        warnings.warn(
            f"{name}={delta:g} is at least 1/N = {1.0 / n:g}: a mechanism that publishes one "
            f"random example outright meets such a delta. Use delta well below 1/N, e.g. "
            f"{10 ** math.floor(math.log10(0.1 / n)):g}.", PrivacyWarning, stacklevel=3)
