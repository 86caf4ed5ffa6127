"""Quantile-based adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021): the bound follows a quantile of the
per-example gradient norms, estimated privately at every step, so it needs no tuning.

At step ``t`` with bound ``C_t`` the release is a pair:

- the clipped sum of the gradients plus ``N(0, (z_grad C_t)^2)`` (sensitivity ``C_t``), and
- the *centred* count of examples within the bound, ``sum_b (1[||g_b|| <= C_t] - 1/2)``, plus
  ``N(0, sigma_b^2)`` (sensitivity 1/2: adding or removing an example moves it by +-1/2).

From the count, ``estimate = noisy count / m + 1/2`` (``m`` the expected batch size; unbiased
under Poisson sampling) and ``C_{t+1} = C_t exp(-lr (estimate - target_quantile))``.

Privacy:
    Scaled by ``1 / (z_grad C_t)`` and ``1 / sigma_b``, the pair is a Gaussian mechanism with unit
    noise whose shift has norm at most ``sqrt(z_grad^-2 + (2 sigma_b)^-2)``. With
    ``z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (``gradient_noise_multiplier()``) that is
    ``1 / z``: one step is exactly one Gaussian mechanism with the requested noise multiplier
    ``z`` on the Poisson sample, so the accountant records DP-SGD's own event and needs no
    change (Theorem 1 of the paper; tests/privatize/test_adaptive_clipping.py checks the
    composition against dp_accounting). ``C_t`` is computed from earlier releases only, so it is
    public; the bounds and estimates kept here are post-processing of the releases.
"""

from __future__ import annotations

import math

import torch

from privgrad import _validate
from privgrad.errors import ConfigError

__all__ = ["QuantileBound", "gradient_noise_multiplier", "DEFAULT_LR", "DEFAULT_QUANTILE"]

#: The paper's defaults: the median, and a geometric step of 0.2.
DEFAULT_QUANTILE = 0.5
DEFAULT_LR = 0.2
#: The count's noise, as a fraction of the expected batch size (the paper's ``m / 20``).
COUNT_NOISE_PER_EXAMPLE = 1 / 20


def gradient_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: the gradient's noise multiplier that keeps the
    pair (gradient, count) at noise multiplier ``z``; 0 when ``z`` is 0 (no privacy)."""
    if noise_multiplier == 0:
        return 0.0
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


class QuantileBound:
    """The adaptive bound of one run: its value, its history and the update rule.

    Args:
        bound: the initial bound ``C_0`` (``max_grad_norm``).
        target_quantile: the share of examples the bound should leave unclipped, in (0, 1).
        lr: the geometric step ``eta`` (0 keeps the bound fixed and still releases the count).
        count_noise_std: ``sigma_b``, the std of the noise on the count, in examples.

    Attributes:
        bound: the bound the next step clips at.
        bounds: the bound each released step used, in order.
        estimates: each step's released estimate of the share within its bound.
    """

    def __init__(self, bound: float, target_quantile: float, lr: float, count_noise_std: float):
        self._bound = float(bound)
        self.target_quantile = target_quantile
        self.lr = lr
        self.count_noise_std = count_noise_std
        self.bounds: list[float] = []
        self.estimates: list[float] = []

    @property
    def bound(self) -> float:
        return self._bound

    @bound.setter
    def bound(self, value: float) -> None:
        """Set by hand, it applies from the next logical step on (the current one keeps the
        bound its first backward pass clipped at)."""
        self._bound = _validate.positive("bound", value, "Pass a clipping bound, e.g. 1.0.")

    def release(self, within: torch.Tensor | int, examples: torch.Tensor | int,
                noise) -> torch.Tensor:
        """The noisy centred count of one logical step, drawn from ``noise`` (the engine's
        source: reproducible, or secure), as a float64 tensor of one element."""
        centred = torch.as_tensor(within, dtype=torch.float64) - torch.as_tensor(
            examples, dtype=torch.float64) / 2
        return noise.add_noise(centred.reshape(1), self.count_noise_std)

    def update(self, noisy_count: float, expected_batch_size: float, used: float) -> None:
        """Record the step (the bound ``used`` and the estimate) and move the bound toward the
        quantile, from the bound the step used."""
        estimate = float(noisy_count) / expected_batch_size + 0.5
        self.bounds.append(used)
        self.estimates.append(estimate)
        self._bound = used * math.exp(-self.lr * (estimate - self.target_quantile))

    def state_dict(self) -> dict:
        return {"bound": self.bound, "bounds": list(self.bounds), "estimates": list(self.estimates)}

    def load_state_dict(self, state: dict) -> None:
        self.bound = state["bound"]
        self.bounds = [float(b) for b in state["bounds"]]
        self.estimates = [float(e) for e in state["estimates"]]


def check_options(*, clipping: str, noise_multiplier: float, target_quantile, quantile_lr,
                  count_noise_std, gamma) -> dict:
    """The options of ``clipping="adaptive"`` and ``"automatic"``, checked; ``None`` where the
    default applies (``count_noise_std``'s depends on the expected batch size)."""
    adaptive = {"target_quantile": target_quantile, "quantile_lr": quantile_lr,
                "count_noise_std": count_noise_std}
    stray = {k: v for k, v in adaptive.items() if v is not None} if clipping != "adaptive" else {}
    if gamma is not None and clipping != "automatic":
        stray["gamma"] = gamma
    for name, value in stray.items():
        owner = "automatic" if name == "gamma" else "adaptive"
        raise ConfigError(f"{name} is an option of clipping='{owner}'; got {name}={value!r} with "
                          f"clipping={clipping!r}. Pass clipping='{owner}', or drop {name}=.")
    out = {}
    if clipping == "automatic":
        out["gamma"] = 0.01 if gamma is None else _validate.positive(
            "gamma", gamma, "Pass a small stability constant, e.g. 0.01 (Bu et al.'s).")
    if clipping == "adaptive":
        out["target_quantile"] = DEFAULT_QUANTILE if target_quantile is None else _validate.open_unit(
            "target_quantile", target_quantile, "Pass the share of examples to leave unclipped, "
                                                "e.g. 0.5 (the median).")
        out["quantile_lr"] = DEFAULT_LR if quantile_lr is None else _validate.finite_nonnegative(
            "quantile_lr", quantile_lr, "Pass the geometric step of the bound, e.g. 0.2.")
        if count_noise_std is not None:
            std = _validate.positive("count_noise_std", count_noise_std,
                                     "Pass the count's noise std in examples, e.g. the expected "
                                     "batch size / 20, or leave it unset for that default.")
            check_count_noise(std, noise_multiplier)
            out["count_noise_std"] = float(std)
    return out


def check_count_noise(count_noise_std: float, noise_multiplier: float) -> None:
    """The count's noise must leave room for the gradient's: ``2 sigma_b > z``."""
    if noise_multiplier > 0 and not 2 * count_noise_std > noise_multiplier:
        raise _validate.fail(
            f"count_noise_std must exceed noise_multiplier / 2 = {noise_multiplier / 2:g} (the "
            f"count's share of the privacy would leave the gradient no noise)", "count_noise_std",
            count_noise_std, "Pass a larger count_noise_std (the paper uses the expected batch "
                             "size / 20), or leave it unset")


def default_count_noise(expected_batch_size: float, noise_multiplier: float) -> float:
    """The paper's ``sigma_b = m / 20``, raised where a small batch would leave the gradient too
    little of the budget (then ``2 sigma_b = 2 z``: the gradient's noise grows by 15%)."""
    return max(expected_batch_size * COUNT_NOISE_PER_EXAMPLE, noise_multiplier)
