"""Quantile-based adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021): the bound follows a quantile of the
per-example gradient norms, estimated privately at every step, so it needs no tuning.

At step ``t`` with bound ``C_t`` the release is a pair:

- the clipped sum of the gradients plus ``N(0, (z_grad C_t)^2)`` (sensitivity ``C_t``), and
- the *centred* count of examples within the bound, ``sum_b (1[||g_b|| <= C_t] - 1/2)``, plus
  ``N(0, sigma_b^2)`` (sensitivity 1/2: adding or removing an example moves it by +-1/2).

From the count, ``estimate = noisy count / m + 1/2`` (``m`` the expected batch size; unbiased
under Poisson sampling) and ``C_{t+1} = C_t exp(-lr (estimate - target_quantile))``. The engine
releases the gradient in units of ``C_t`` (divided by it: post-processing by a public number), so
the optimizer sees the scale of flat clipping at ``C = 1`` however the bound moves.

Privacy:
    Scaled by ``1 / (z_grad C_t)`` and ``1 / sigma_b``, the pair is a Gaussian mechanism with unit
    noise whose shift has norm at most ``sqrt(z_grad^-2 + (2 sigma_b)^-2)``. With
    ``z_grad = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (``gradient_noise_multiplier()``) that is
    ``1 / z``: one step is exactly one Gaussian mechanism with the requested noise multiplier
    ``z`` on the Poisson sample, so the accountant records DP-SGD's own event and needs no
    change (Theorem 1 of the paper; tests/privatize/test_adaptive_clipping.py checks the
    composition against dp_accounting). Per-layer adaptive clipping releases one centred count
    per parameter, ``K`` in all: one example moves them by ``sqrt(K) / 2`` together, and the
    gradient (per-layer bounds composing to ``C_t``) by ``C_t``, so
    ``z_grad = (z^-2 - K (2 sigma_b)^-2)^(-1/2)``. ``C_t`` is computed from earlier releases only, so it is
    public; the bounds and estimates kept here are post-processing of the releases.
"""

from __future__ import annotations

import math

import torch

from privgrad import _validate
from privgrad.errors import ConfigError

__all__ = ["ADAPTIVE", "DEFAULT_LR", "DEFAULT_QUANTILE", "QuantileBound", "gradient_noise_multiplier"]

#: The 90th percentile (the paper uses the median): measured better in units of the bound, within
#: 0.12 points of the best fixed bound on Adult and ahead of it on Fashion-MNIST from starts 100x
#: off either way, where the median fell 0.7-1.3 points behind on Adult at epsilon 1
#: (docs/examples.md). The paper's geometric step of 0.2.
DEFAULT_QUANTILE = 0.9
DEFAULT_LR = 0.2
#: The count's noise, as a fraction of the expected batch size (the paper's ``m / 20``).
COUNT_NOISE_PER_EXAMPLE = 1 / 20


def gradient_noise_multiplier(noise_multiplier: float, count_noise_std: float,
                              counts: int = 1) -> float:
    """``z_grad = (z^-2 - counts (2 sigma_b)^-2)^(-1/2)``: the gradient's noise multiplier that
    keeps the pair (gradient, ``counts`` counts) at noise multiplier ``z``; 0 when ``z`` is 0 (no
    privacy). One example moves each count by 1/2, so ``counts`` of them by ``sqrt(counts) / 2``."""
    if noise_multiplier == 0:
        return 0.0
    return (noise_multiplier ** -2 - counts * (2 * count_noise_std) ** -2) ** -0.5


class QuantileBound:
    """The adaptive bound (or per-layer bounds) of one run: value, history and update rule.

    Args:
        bound: the initial bound ``C_0`` (``max_grad_norm``), or one initial bound per
            parameter (per-layer adaptive clipping), each following its own parameter's norms.
        target_quantile: the share of examples the bound should leave unclipped, in (0, 1).
        lr: the geometric step ``eta`` (0 keeps the bound fixed and still releases the count).
        count_noise_std: ``sigma_b``, the std of the noise on each count, in examples.

    Attributes:
        bound: the bound the next step clips at (a tuple of per-layer bounds, in the
            optimizer's parameter order, for per-layer adaptive clipping).
        bounds: the bound each released step used, in order.
        estimates: each step's released estimate of the share within its bound (a tuple per
            step for per-layer bounds).
    """

    def __init__(self, bound: float | tuple, target_quantile: float, lr: float,
                 count_noise_std: float):
        self.per_layer = isinstance(bound, (tuple, list))
        self._values = tuple(float(b) for b in bound) if self.per_layer else (float(bound),)
        self.target_quantile = target_quantile
        self.lr = lr
        self.count_noise_std = count_noise_std
        self.bounds: list = []
        self.estimates: list = []

    @property
    def counts(self) -> int:
        """How many counts a step releases (one per bound)."""
        return len(self._values)

    @property
    def bound(self) -> float | tuple:
        return self._values if self.per_layer else self._values[0]

    @bound.setter
    def bound(self, value: float | tuple) -> None:
        """Set by hand, it applies from the next logical step on (the current one keeps the
        bound its first backward pass clipped at)."""
        values = tuple(value) if self.per_layer else (value,)
        if len(values) != len(self._values):
            raise _validate.fail(f"bound must have {len(self._values)} values", "bound", value,
                                 "Pass one bound per parameter, in the optimizer's order.")
        self._values = tuple(_validate.positive("bound", v, "Pass a clipping bound, e.g. 1.0.")
                             for v in values)

    @property
    def total(self) -> float:
        """``C``: the bound, or the root-sum-of-squares of the per-layer bounds."""
        return math.sqrt(sum(c * c for c in self._values))

    def release(self, within: torch.Tensor, examples: torch.Tensor | float, noise) -> torch.Tensor:
        """The noisy centred counts of one logical step (``within``: one count per bound),
        drawn from ``noise`` (the engine's source: reproducible, or secure), float64."""
        centred = torch.as_tensor(within, dtype=torch.float64).reshape(-1) - torch.as_tensor(
            examples, dtype=torch.float64) / 2
        return noise.add_noise(centred, self.count_noise_std)

    def update(self, noisy_counts, expected_batch_size: float, used: float | tuple) -> None:
        """Record the step (the bound ``used`` and the estimate) and move each bound toward the
        quantile, from the bound the step used; a bound set by hand during the step is kept."""
        noisy = torch.as_tensor(noisy_counts, dtype=torch.float64).reshape(-1).tolist()
        estimates = tuple(c / expected_batch_size + 0.5 for c in noisy)
        used = tuple(used) if self.per_layer else (float(used),)
        if self._values == used:
            self._values = tuple(c * math.exp(-self.lr * (e - self.target_quantile))
                                 for c, e in zip(used, estimates))
        self.bounds.append(used if self.per_layer else used[0])
        self.estimates.append(estimates if self.per_layer else estimates[0])

    def state_dict(self) -> dict:
        plain = (lambda v: list(v)) if self.per_layer else float
        return {"bound": plain(self.bound), "bounds": [plain(b) for b in self.bounds],
                "estimates": [plain(e) for e in self.estimates]}

    def load_state_dict(self, state: dict) -> None:
        kind = (lambda v: tuple(float(x) for x in v)) if self.per_layer else float
        self.bound = kind(state["bound"])
        self.bounds = [kind(b) for b in state["bounds"]]
        self.estimates = [kind(e) for e in state["estimates"]]


#: The clipping modes whose bound adapts (their options: target_quantile, quantile_lr,
#: count_noise_std).
ADAPTIVE = ("adaptive", "per_layer_adaptive")


def check_options(*, clipping: str, noise_multiplier: float, target_quantile, quantile_lr,
                  count_noise_std, gamma, counts: int = 1) -> dict:
    """The options of the adaptive modes and of ``"automatic"``, checked; ``None`` where the
    default applies (``count_noise_std``'s depends on the expected batch size). ``counts``: the
    counts a step releases (the number of per-layer bounds)."""
    adaptive = {"target_quantile": target_quantile, "quantile_lr": quantile_lr,
                "count_noise_std": count_noise_std}
    stray = {k: v for k, v in adaptive.items() if v is not None} if clipping not in ADAPTIVE else {}
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
    if clipping in ADAPTIVE:
        out["target_quantile"] = DEFAULT_QUANTILE if target_quantile is None else _validate.open_unit(
            "target_quantile", target_quantile, "Pass the share of examples to leave unclipped, "
                                                "e.g. 0.5 (the median).")
        out["quantile_lr"] = DEFAULT_LR if quantile_lr is None else _validate.finite_nonnegative(
            "quantile_lr", quantile_lr, "Pass the geometric step of the bound, e.g. 0.2.")
        if count_noise_std is not None:
            std = _validate.positive("count_noise_std", count_noise_std,
                                     "Pass the count's noise std in examples, e.g. the expected "
                                     "batch size / 20, or leave it unset for that default.")
            check_count_noise(std, noise_multiplier, counts)
            out["count_noise_std"] = float(std)
    return out


def check_count_noise(count_noise_std: float, noise_multiplier: float, counts: int = 1) -> None:
    """The counts' noise must leave room for the gradient's: ``2 sigma_b > sqrt(counts) z``."""
    floor = math.sqrt(counts) * noise_multiplier / 2
    if noise_multiplier > 0 and not count_noise_std > floor:
        what = "noise_multiplier / 2" if counts == 1 else f"sqrt({counts} bounds) * noise_multiplier / 2"
        raise _validate.fail(
            f"count_noise_std must exceed {what} = {floor:g} (the count's share of the privacy "
            f"would leave the gradient no noise)", "count_noise_std", count_noise_std,
            "Pass a larger count_noise_std (the paper uses the expected batch size / 20), or "
            "leave it unset")


def default_count_noise(expected_batch_size: float, noise_multiplier: float,
                        counts: int = 1) -> float:
    """The paper's ``sigma_b = m / 20``, raised where a small batch (or many per-layer counts)
    would leave the gradient too little of the budget: at least ``sqrt(counts) z``, so that the
    gradient's noise grows by at most 15%."""
    return max(expected_batch_size * COUNT_NOISE_PER_EXAMPLE, math.sqrt(counts) * noise_multiplier)
