"""The settings of a private run and the checks of its arguments.

``PrivacySettings`` holds what determines the guarantee (changing any of it changes
epsilon), ``PerformanceSettings`` what determines speed and memory only. The functions below
are pure checks of ``make_private``'s arguments: each validates one value once, in the one error
format of ``privgrad._validate``, before anything is attached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from privgrad import _validate
from privgrad.errors import ConfigError, ConfigTypeError
from privgrad.privatize.adaptive import ADAPTIVE, check_options, gradient_noise_multiplier
from privgrad.privatize.clipping import per_layer_bounds


#: The clipping modes with one bound per parameter.
PER_LAYER = ("per_layer", "per_layer_adaptive")


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
    #: clipping="automatic": the stability constant of ``C g / (||g|| + gamma)``
    gamma: float | None = None
    #: clipping="adaptive": the quantile the bound follows, its geometric step, the count's noise
    target_quantile: float | None = None
    quantile_lr: float | None = None
    count_noise_std: float | None = None
    #: a correlated-noise mechanism (``repr``) and the steps its noise is planned for; ``None``
    #: for DP-SGD (``privgrad.mechanism_run``)
    mechanism: str | None = None
    planned_steps: int | None = None
    #: what one unit of privacy is: "example", or "user" (all of a person's rows; the sampling
    #: is over users and each sampled user's summed gradient is clipped to C)
    privacy_unit: str = "example"
    #: privacy_unit="user": the most examples one user contributes to a step (k)
    max_examples_per_user: int | None = None
    #: truncated Poisson sampling: every batch cut and padded to this many rows (M)
    max_batch_size: int | None = None

    @property
    def total_bound(self) -> float:
        """``C``: the flat bound, or the root-sum-of-squares of per-layer bounds (adaptive
        clipping: the initial bound; the engine's ``clipping_bound`` is the current one)."""
        if isinstance(self.max_grad_norm, tuple):
            return math.sqrt(sum(c * c for c in self.max_grad_norm))
        return float(self.max_grad_norm)

    @property
    def noise_std(self) -> float:
        """The gradient's noise std (adaptive clipping: at the initial bound)."""
        return self.gradient_noise_multiplier * self.total_bound

    @property
    def gradient_noise_multiplier(self) -> float:
        """The noise multiplier of the gradient: ``noise_multiplier``, except under adaptive
        clipping, where the counts' release takes its share (``privgrad.privatize.adaptive``)."""
        if self.clipping not in ADAPTIVE:
            return self.noise_multiplier
        counts = len(self.max_grad_norm) if self.clipping == "per_layer_adaptive" else 1
        return gradient_noise_multiplier(self.noise_multiplier, self.count_noise_std, counts)

    @property
    def normaliser(self) -> float:
        return self.expected_batch_size if self.loss_reduction == "mean" else 1.0

    def bounds(self, params: list[nn.Parameter]) -> float | dict[nn.Parameter, float]:
        """The clipping bounds, computed once when the guarantee is set: ``C`` (flat), or one
        bound per parameter of ``params`` (per-layer; their root-sum-of-squares is ``C``).

        Privacy:
            Per-layer bounds exist for these parameters only: a parameter trainable later has
            none and is refused (a fresh bound would raise the sensitivity above ``C``).
        """
        if self.clipping not in PER_LAYER:
            return float(self.max_grad_norm)
        return per_layer_bounds(params, self.max_grad_norm)


@dataclass(frozen=True)
class Arguments:
    """``make_private``'s arguments, checked (see ``check_arguments()``)."""

    noise_multiplier: float
    max_grad_norm: float | tuple
    clipping: str
    loss_reduction: str
    grad_sample_mode: str
    check: str
    params: list
    clipping_options: dict  # gamma, target_quantile, quantile_lr, count_noise_std (checked)


@dataclass(frozen=True)
class PerformanceSettings:
    """What determines speed and memory only. Changing these never changes epsilon or the
    distribution of the update."""

    grad_sample_mode: str = "auto"



# -- argument checks (pure functions of the arguments) ----------------------------------------
#: Opacus's grad_sample_mode names, accepted so that switching is a change of import.
MODE_ALIASES = {"hooks": "materialize", "functorch": "materialize", "ew": "materialize",
                "ghost": "auto"}
CHECKS = ("first_step", "every_step")


#: Keywords of Opacus's make_private that privgrad does not take, and what to do instead.
OPACUS_KEYWORDS = {
    "criterion": "privgrad needs no loss object: ghost clipping is chosen per layer without it "
                 "(grad_sample_mode='auto'); drop criterion=, or import privgrad.opacus, which "
                 "takes Opacus's call unchanged",
    "noise_generator": "the engine draws its noise from its own generator, seeded at "
                       "make_private after torch.manual_seed; drop noise_generator=, or pass a "
                       "noise source to PrivacyEngine(noise=...)",
    "batch_first": "each layer rule knows its layer's batch dimension; give the model "
                   "batch-first tensors (batch_first=True on recurrent and attention layers) and "
                   "drop batch_first= (docs/migration.md)",
    "wrap_model": "privgrad never wraps the model (it only adds hooks); drop wrap_model=",
    "rand_on_empty": "an empty Poisson batch is a batch of size 0 whose step is all noise; "
                     "drop rand_on_empty=",
    "grad_sample_mode_kwargs": "drop it; grad_sample_mode alone selects the method",
}


def refuse_unknown(unknown: dict, where: str) -> None:
    """Refuse keywords ``where`` does not take, with what to do for Opacus's."""
    if not unknown:
        return
    name = sorted(unknown)[0]
    fix = OPACUS_KEYWORDS.get(name, f"Check the spelling against {where}'s documentation")
    raise ConfigTypeError(f"{where} takes no {name}= argument; got {name}="
                          f"{unknown[name]!r}. {fix[0].upper() + fix[1:]}.")


def check_accountant(name: object) -> object:
    """``name``, with a clear refusal of Opacus's accountant names (make_accountant checks the
    rest)."""
    if name in ("prv", "gdp"):
        raise _validate.fail(
            "accountant must be 'pld' or 'rdp'", "accountant", name,
            "privgrad's 'pld' accountant is at least as tight as Opacus's 'prv' and, unlike "
            "'gdp', an upper bound; pass accountant='pld' (privgrad.opacus maps 'prv' and 'gdp' "
            "to it)")
    return name


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool (a string such as ``"no"`` would be true)."""
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{name} must be True or False; got {name}={value!r}. Pass a bool "
                              f"(a string such as 'no' counts as true in Python).")
    return value


def check_arguments(*, module, optimizer, noise_multiplier, max_grad_norm, clipping="flat",
                    loss_reduction="mean", grad_sample_mode="auto", check="first_step",
                    gamma=None, target_quantile=None, quantile_lr=None,
                    count_noise_std=None) -> Arguments:
    """Every privacy and performance argument of ``make_private``, validated once, in the one
    error format; the optimizer's trainable parameters with them."""
    from privgrad.engine.batch import MODES
    from privgrad.privatize import CLIPPING

    sigma = _validate.finite_nonnegative(
        "noise_multiplier", noise_multiplier,
        "Pass the noise std relative to max_grad_norm, e.g. 1.0, or use "
        "make_private_with_epsilon.")
    clipping = _validate.choice("clipping", clipping, CLIPPING)
    loss_reduction = _validate.choice("loss_reduction", loss_reduction, ("mean", "sum"))
    mode = MODE_ALIASES.get(grad_sample_mode, grad_sample_mode)
    _validate.choice("grad_sample_mode", mode, MODES)
    check = _validate.choice("check", check, CHECKS)
    if not isinstance(module, nn.Module):
        raise _validate.fail("module must be a torch.nn.Module", "module",
                             type(module).__name__, "Pass your model.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise _validate.fail("optimizer must be a torch.optim.Optimizer", "optimizer",
                             type(optimizer).__name__, "Pass your optimizer.")
    params = privatised(optimizer)
    if not params:
        raise ConfigError(
            "private training needs at least one trainable parameter in the optimizer; got "
            "none that requires grad. Unfreeze what you want to train (requires_grad_(True)) "
            "and build the optimizer over it.")
    bound = check_bound(max_grad_norm, clipping, len(params))
    if clipping == "per_layer_adaptive":  # the bounds adapt one by one: each is recorded
        bound = tuple(per_layer_bounds(params, bound).values())
    options = check_options(clipping=clipping, noise_multiplier=sigma, gamma=gamma,
                            target_quantile=target_quantile, quantile_lr=quantile_lr,
                            count_noise_std=count_noise_std,
                            counts=len(params) if clipping == "per_layer_adaptive" else 1)
    return Arguments(sigma, bound, clipping, loss_reduction, mode, check, params, options)


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
        if clipping not in PER_LAYER:
            raise _validate.fail("a list of bounds needs clipping='per_layer'", "max_grad_norm",
                                 max_grad_norm, "Pass one float, or clipping='per_layer' (or "
                                 "'per_layer_adaptive').")
        bounds = tuple(_validate.positive("max_grad_norm", c, fix) for c in max_grad_norm)
        if len(bounds) != num_params:
            raise _validate.fail(
                f"per-layer bounds must number the optimizer's {num_params} trainable "
                f"parameters", "max_grad_norm", max_grad_norm,
                "Pass one bound per parameter (optimizer order), or one float to split equally.")
        return bounds
    return _validate.positive("max_grad_norm", max_grad_norm, fix)


def check_ownership(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer parameters must belong to the module, and trainable module parameters must be
    in the optimizer (their autograd gradients would otherwise sit unprivatised in ``.grad``)."""
    # keyed by id: runs every step, and a parameter's own __hash__ is a Python call
    owned = {id(p): p for m in module.modules() for p in m._parameters.values() if p is not None}
    in_optimizer = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    if in_optimizer.keys() <= owned.keys() and not any(
            p.requires_grad and i not in in_optimizer for i, p in owned.items()):
        return
    stray = [p for i, p in in_optimizer.items() if i not in owned]
    if stray:
        shapes = ", ".join(str(tuple(p.shape)) for p in stray[:5])
        raise ConfigError(
            f"every optimizer parameter must belong to the module; got {len(stray)} that do not "
            f"(shapes {shapes}). Build the optimizer from module.parameters().")
    left_out = [name for name, p in module.named_parameters()
                if p.requires_grad and id(p) not in in_optimizer]
    if left_out:
        raise ConfigError(
            f"every trainable module parameter must be in the optimizer; got "
            f"{', '.join(left_out[:5])} left out. Add them to the optimizer or freeze them "
            f"(requires_grad_(False)).")


def calibrate(sampling, *, target_epsilon, target_delta, epochs, steps, accountant,
              prior=None) -> float:
    """The smallest noise multiplier that keeps epsilon at or below ``target_epsilon`` after
    ``prior`` (what was spent already, an event or ``None``) and ``epochs`` epochs or ``steps``
    steps (exactly one) of ``sampling``
    ([`SamplingPlan`][privgrad.sampling.plan.SamplingPlan]), per ``accountant``."""
    from privgrad.accounting import get_noise_multiplier

    eps = _validate.positive("target_epsilon", target_epsilon, "Pass the privacy budget, e.g. 3.0.")
    delta = _validate.open_unit("target_delta", target_delta,
                                "Pass a delta well below 1/N, e.g. 1e-5.")
    if (epochs is None) == (steps is None):
        raise _validate.fail(
            "exactly one of epochs and steps must be given", "(epochs, steps)",
            (epochs, steps), "Pass epochs=<training epochs> or steps=<optimizer steps>.")
    if sampling.units is not None:
        warn_large_delta(delta, sampling.units, "target_delta", stacklevel=4)
    if steps is None:
        epochs = _validate.positive_int("epochs", epochs, "Pass the number of training epochs.")
        steps = epochs * sampling.steps_per_epoch
    steps = _validate.positive_int("steps", steps, "Pass the number of optimizer steps.")
    truncated = getattr(sampling, "max_batch_size", None) is not None  # its own event
    return get_noise_multiplier(target_epsilon=eps, target_delta=delta,
                                sample_rate=sampling.sample_rate, steps=steps,
                                accountant=accountant, event=sampling.event if truncated else None,
                                prior=prior)


def warn_large_delta(delta: float, n: int, name: str, stacklevel: int = 3) -> None:
    """Warn when ``delta`` is at least ``1 / n`` (``stacklevel``: the user's call)."""
    if delta >= 1.0 / n:
        warnings.warn(
            f"{name}={delta:g} is at least 1/N = {1.0 / n:g}: a mechanism that publishes one "
            f"random example outright meets such a delta. Use delta well below 1/N, e.g. "
            f"{10 ** math.floor(math.log10(0.1 / n)):g}.", PrivacyWarning, stacklevel=stacklevel)
