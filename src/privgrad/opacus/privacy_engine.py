"""Opacus's ``PrivacyEngine`` on privgrad's: the same calls, privgrad's mechanism and guards.

``privgrad.opacus.PrivacyEngine`` holds a ``privgrad.PrivacyEngine`` (``.privgrad_engine``) and
translates Opacus's keywords and return values. What Opacus code gets back:

- ``make_private`` returns ``(module, optimizer, data_loader)``, or in ghost mode
  ``(module, optimizer, criterion, data_loader)`` as Opacus does. ``module`` is the user's model
  itself (privgrad wraps nothing: ``state_dict()`` keys unchanged, no ``_module``);
  ``optimizer`` is a ``PrivateOptimizer``, a stateless view over the user's optimizer that
  adds Opacus's read-only attributes (``noise_multiplier``, ``max_grad_norm``,
  ``expected_batch_size`` per rank, ``original_optimizer``); ``criterion`` is the user's own
  (ghost norms come from privgrad's hooks, no second backward pass is needed).
- ``accountant`` is an Opacus-style view (``history`` as a list, ``len``, ``mechanism()``) over
  the privgrad engine's accountant; ``"prv"`` and ``"gdp"`` are served by privgrad's PLD.

Where Opacus behaviour is unsafe, privgrad's wins (each stated in docs/migration.md):
``loss_reduction="mean"`` divides by the *expected* batch size, as Opacus does, never by the
realised one; ``batch_first=False`` is refused (privgrad's rules know each layer's batch
dimension, and a ``Linear`` given ``(T, B, ...)`` tensors would clip positions instead of
examples); a step whose rows are not the batch the private loader drew is refused;
``grad_sample_mode="no_op"`` (per-sample gradients supplied by the user) is refused;
``poisson_sampling=False`` warns (``privgrad.settings.PrivacyWarning``).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

from torch import nn

import privgrad
from privgrad import _validate
from privgrad.distributed import data_parallel
from privgrad.errors import PrivacyStateError
from privgrad.opacus.accountants.accountant import EngineAccountant, privgrad_kind
from privgrad.opacus.grad_sample import GradSampleModule
from privgrad.opacus.optimizers import DPOptimizer, OptimizerView, PrivateOptimizer
from privgrad.opacus.validators import ModuleValidator

__all__ = ["PrivacyEngine", "forbid_accumulation_hook"]

# Keywords of Opacus's make_private_with_epsilon that tune its noise search; privgrad's search
# never overshoots the target, so they are accepted and unused.
_SEARCH_KEYWORDS = frozenset({"epsilon_tolerance", "eps_error", "delta_error", "alphas"})
_ADAPTED = frozenset({"module", "optimizer", "data_loader", "noise_multiplier", "max_grad_norm",
                      "loss_reduction", "poisson_sampling", "clipping", "grad_sample_mode",
                      "target_epsilon", "target_delta", "epochs", "self"})


def _privgrad_keywords(method) -> frozenset:
    """privgrad's own keywords of ``method`` (and of ``make_private``, which it forwards its
    extra keywords to) that this adapter passes through untouched."""
    named = set()
    for function in (method, privgrad.PrivacyEngine.make_private):
        named |= {name for name, p in inspect.signature(function).parameters.items()
                  if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return frozenset(named) - _ADAPTED


#: Opacus's keywords of clipping="adaptive" (AdaClipDPOptimizer) -> privgrad's.
_ADAPTIVE = {"target_unclipped_quantile": "target_quantile",
             "clipbound_learning_rate": "quantile_lr", "unclipped_num_std": "count_noise_std"}


def _adaptive_keywords(kwargs: dict) -> dict:
    """Opacus's adaptive-clipping keywords as privgrad's. The count's noise std carries over
    (privgrad adds it to the *centred* count, whose sensitivity is 1/2 as the noise split
    assumes; Opacus adds it to the uncentred one). ``max_clipbound``/``min_clipbound`` clamp
    the bound in Opacus; privgrad's bound follows the quantile unclamped, which a warning says."""
    out = {_ADAPTIVE.get(k, k): v for k, v in kwargs.items()
           if k not in ("max_clipbound", "min_clipbound")}
    clamps = {k: kwargs[k] for k in ("max_clipbound", "min_clipbound") if k in kwargs}
    if clamps:
        warnings.warn(f"privgrad's adaptive bound is not clamped; got {clamps}, which are unused "
                      f"(the bound follows target_quantile; see docs/clipping.md).", UserWarning,
                      stacklevel=4)
    return out


class PrivacyEngine:
    """Opacus's ``PrivacyEngine``, served by ``privgrad.PrivacyEngine``.

    Args:
        accountant: ``"prv"`` (Opacus's default) or ``"gdp"``: privgrad's PLD accountant;
            ``"rdp"``: privgrad's RDP accountant; ``"pld"`` is accepted too.
        secure_mode: privgrad's secure mode (CSPRNG sampling and noise; needs
            ``privgrad[secure]``, not ``torchcsprng``).

    Attributes:
        privgrad_engine: the ``privgrad.PrivacyEngine`` doing the work (its own API:
            ``virtual_batches``, ``detach``, ``state_dict``...).
        accountant: Opacus's view of its accountant.

    Privacy:
        privgrad's guarantee and assumptions (see ``privgrad.PrivacyEngine``): add/remove-one
        (epsilon, delta)-DP of the released noisy gradients under Poisson sampling, with the
        engine's run-time guards.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        self.privgrad_engine = privgrad.PrivacyEngine(accountant=privgrad_kind(accountant),
                                                      secure_mode=secure_mode)
        self.accountant = EngineAccountant(self.privgrad_engine, accountant)
        self.secure_mode = self.privgrad_engine.secure_mode

    # -- making private --------------------------------------------------------------------
    def make_private(self, *, module: nn.Module, optimizer, data_loader, noise_multiplier: float,
                     max_grad_norm, criterion=None, batch_first: bool = True,
                     loss_reduction: str = "mean", poisson_sampling: bool = True,
                     clipping: str = "flat", noise_generator=None,
                     grad_sample_mode: str | None = None, wrap_model: bool = True,
                     rand_on_empty: bool = False, **kwargs):
        """Opacus's ``make_private``: attach privgrad to the model and optimizer.

        Opacus's keywords are taken here: ``criterion`` (returned in ghost mode; its
        ``reduction`` must match ``loss_reduction``), ``batch_first`` (``True`` only),
        ``noise_generator`` (``None`` only: privgrad's noise has its own generator, seeded from
        ``torch.manual_seed``, or ``secure_mode``), ``wrap_model`` (either: nothing is
        wrapped), ``rand_on_empty`` (``False`` only: an empty Poisson batch is a batch of size
        0 and its step adds the full noise), ``grad_sample_mode`` (performance only: default
        privgrad's ``"auto"``; ``"hooks"``, ``"functorch"``, ``"ew"`` materialise; ``"ghost"``
        returns the criterion too; ``"no_op"`` is refused). Further keywords are
        ``privgrad.PrivacyEngine.make_private``'s own (``sample_rate``, ``distributed``...).

        Returns:
            ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion,
            data_loader)`` when ``grad_sample_mode`` names ghost clipping.

        Privacy:
            As ``privgrad.PrivacyEngine.make_private``.
        """
        opacus = _OpacusKeywords(criterion, batch_first, noise_generator, grad_sample_mode,
                                 wrap_model, rand_on_empty)
        return self._attach(self.privgrad_engine.make_private, opacus, kwargs, module=module,
                            optimizer=optimizer, data_loader=data_loader,
                            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                            loss_reduction=loss_reduction, poisson_sampling=poisson_sampling,
                            clipping=clipping)

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer, data_loader,
                                  target_epsilon: float, target_delta: float,
                                  epochs: int | None = None, max_grad_norm, criterion=None,
                                  batch_first: bool = True, loss_reduction: str = "mean",
                                  poisson_sampling: bool = True, clipping: str = "flat",
                                  noise_generator=None, grad_sample_mode: str | None = None,
                                  wrap_model: bool = True, rand_on_empty: bool = False,
                                  **kwargs):
        """Opacus's ``make_private_with_epsilon``: ``make_private`` with the smallest noise that
        keeps epsilon at or below ``target_epsilon`` after ``epochs`` epochs (privgrad's
        calibration, checked with this engine's accountant; or pass privgrad's ``steps=``
        instead of ``epochs``). Opacus's search keywords (``epsilon_tolerance``...) are
        accepted and unused. Returns as ``make_private``."""
        for name in _SEARCH_KEYWORDS & set(kwargs):
            kwargs.pop(name)
        opacus = _OpacusKeywords(criterion, batch_first, noise_generator, grad_sample_mode,
                                 wrap_model, rand_on_empty)
        return self._attach(self.privgrad_engine.make_private_with_epsilon, opacus, kwargs,
                            module=module, optimizer=optimizer, data_loader=data_loader,
                            target_epsilon=target_epsilon, target_delta=target_delta,
                            epochs=epochs, max_grad_norm=max_grad_norm,
                            loss_reduction=loss_reduction, poisson_sampling=poisson_sampling,
                            clipping=clipping)

    def _attach(self, method, opacus: _OpacusKeywords, kwargs: dict, *, module, optimizer,
                loss_reduction: str, **arguments):
        """Translate Opacus's keywords, call privgrad's ``method``, return Opacus's values."""
        mode, ghost, criterion = opacus.translate(loss_reduction)
        if arguments.get("clipping") == "adaptive":
            kwargs = _adaptive_keywords(kwargs)
        unknown = sorted(set(kwargs) - _privgrad_keywords(method))
        if unknown:
            raise _validate.fail(
                "make_private takes Opacus's keywords and privgrad's own", "keywords", unknown,
                "Drop them (see docs/migration.md for each Opacus keyword).")
        module, original, loader = method(
            module=_plain_module(module), optimizer=_plain_optimizer(optimizer),
            loss_reduction=loss_reduction, grad_sample_mode=mode, **arguments, **kwargs)
        ranks = data_parallel(None, module, True) if self.privgrad_engine.data_parallel else None
        optimizer = PrivateOptimizer(original, self.privgrad_engine,
                                     world_size=ranks.world_size if ranks is not None else 1)
        if ghost:
            return module, optimizer, criterion, loader
        return module, optimizer, loader

    # -- the budget ------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``."""
        return self.privgrad_engine.get_epsilon(delta)

    # -- model checks ----------------------------------------------------------------------
    def is_compatible(self, *, module: nn.Module, optimizer=None, data_loader=None) -> bool:
        """Whether ``module`` passes ``ModuleValidator`` (privgrad's checks)."""
        return ModuleValidator.is_valid(module)

    def validate(self, *, module: nn.Module, optimizer=None, data_loader=None) -> None:
        """``ModuleValidator.validate(module, strict=True)``: raises on any finding."""
        ModuleValidator.validate(module, strict=True)

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """A repaired copy of ``module`` that passes the checks (or an error naming what
        cannot be repaired)."""
        return ModuleValidator.fix_and_validate(module)

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, *, path, module: nn.Module, optimizer=None, noise_scheduler=None,
                        grad_clip_scheduler=None, checkpoint_dict: dict | None = None,
                        module_state_dict_kwargs=None, torch_save_kwargs=None) -> None:
        """Write privgrad's checkpoint (model, optimizer, the whole run's privacy state, atomic;
        see ``privgrad.checkpoint``) with ``checkpoint_dict`` as its user data. ``path`` is a
        file path (not a file object); the schedulers and ``*_kwargs`` are not supported."""
        _unsupported(noise_scheduler=noise_scheduler, grad_clip_scheduler=grad_clip_scheduler,
                     module_state_dict_kwargs=module_state_dict_kwargs,
                     torch_save_kwargs=torch_save_kwargs)
        self.privgrad_engine.save_checkpoint(path, module=module,
                                             optimizer=self._optimizer(optimizer),
                                             extra=checkpoint_dict)

    def load_checkpoint(self, *, path, module: nn.Module, optimizer=None, noise_scheduler=None,
                        grad_clip_scheduler=None, module_load_dict_kwargs=None,
                        torch_load_kwargs=None) -> dict:
        """Resume from ``save_checkpoint``'s file, after ``make_private`` with the same
        settings; returns its ``checkpoint_dict`` (Opacus returns the raw file's dict)."""
        _unsupported(noise_scheduler=noise_scheduler, grad_clip_scheduler=grad_clip_scheduler,
                     module_load_dict_kwargs=module_load_dict_kwargs,
                     torch_load_kwargs=torch_load_kwargs)
        extra = self.privgrad_engine.load_checkpoint(path, module=module,
                                                     optimizer=self._optimizer(optimizer))
        return dict(extra) if extra else {}

    def _optimizer(self, optimizer):
        if optimizer is None:
            optimizer = self.privgrad_engine.optimizer
        return optimizer.original_optimizer if isinstance(optimizer, OptimizerView) else optimizer


@dataclass(frozen=True)
class _OpacusKeywords:
    """Opacus's keywords of ``make_private`` that privgrad has no argument for."""

    criterion: object
    batch_first: object
    noise_generator: object
    grad_sample_mode: str | None
    wrap_model: object
    rand_on_empty: object

    def translate(self, loss_reduction: str) -> tuple[str, bool, object]:
        """``(privgrad's grad_sample_mode, ghost?, criterion)``, refusing what privgrad cannot
        honour, in the one error format."""
        if self.batch_first is not True:
            raise _validate.fail(
                "privgrad serves batch-first models only (each rule knows its layer's batch "
                "dimension; a Linear given (T, B, ...) tensors would clip positions, not "
                "examples)", "batch_first", self.batch_first, "Give the model (B, ...) tensors "
                "(batch_first=True on recurrent and attention layers) and drop "
                "batch_first=False.")
        if self.noise_generator is not None:
            raise _validate.fail(
                "privgrad's noise has its own generator", "noise_generator",
                type(self.noise_generator).__name__, "Drop noise_generator: the noise follows "
                "torch.manual_seed, or pass PrivacyEngine(secure_mode=True) for CSPRNG noise.")
        if not isinstance(self.wrap_model, bool):
            raise _validate.fail("wrap_model must be a bool", "wrap_model", self.wrap_model,
                                 "Drop it: privgrad never wraps the model.")
        if self.rand_on_empty is not False:
            raise _validate.fail(
                "an empty Poisson batch stays empty in privgrad", "rand_on_empty",
                self.rand_on_empty, "Drop rand_on_empty: the loop gets a batch of size 0 and "
                "its step adds the full noise (run the model on it as on any batch).")
        mode = self.grad_sample_mode
        if mode == "no_op":
            raise _validate.fail(
                "privgrad computes the per-sample gradients itself", "grad_sample_mode", mode,
                "Drop grad_sample_mode='no_op' and the code that sets p.grad_sample; call "
                "loss.backward() as usual.")
        ghost = mode is not None and "ghost" in mode
        criterion = self.criterion
        if ghost:
            if criterion is None:
                criterion = nn.CrossEntropyLoss(reduction=loss_reduction)  # Opacus's default
            reduction = getattr(criterion, "reduction", loss_reduction)
            if reduction != loss_reduction:
                raise _validate.fail(
                    f"criterion.reduction must match loss_reduction={loss_reduction!r}",
                    "criterion.reduction", reduction,
                    f"Build the criterion with reduction={loss_reduction!r}, or pass "
                    f"loss_reduction={reduction!r}.")
        return ("auto" if mode is None else mode), ghost, criterion


def _plain_module(module):
    if isinstance(module, GradSampleModule):
        raise _validate.fail(
            "make_private takes the model itself", "module", "GradSampleModule",
            "Pass the model you wrapped (privgrad attaches its own hooks; module = "
            "module.to_standard_module()).")
    return module


def _plain_optimizer(optimizer):
    if isinstance(optimizer, DPOptimizer):
        raise _validate.fail(
            "make_private takes the optimizer itself", "optimizer", type(optimizer).__name__,
            "Pass optimizer.original_optimizer: the engine privatises its steps.")
    return optimizer.original_optimizer if isinstance(optimizer, OptimizerView) else optimizer


def _unsupported(**given) -> None:
    used = sorted(name for name, value in given.items() if value is not None)
    if used:
        raise _validate.fail("privgrad's checkpoints take no schedulers or keyword dicts",
                             "keywords", used, "Drop them (save the scheduler's state in "
                             "checkpoint_dict).")


def forbid_accumulation_hook(module: nn.Module, _inputs) -> None:
    """A forward pre-hook that refuses a second forward pass before the per-sample gradients of
    the first are consumed (``zero_grad``), as Opacus's does.

    Raises:
        PrivacyStateError: a trainable parameter of ``module`` still holds ``grad_sample``.

    Privacy:
        Two Poisson batches accumulated into one step are not one Poisson batch of the
        accounted rate (and two backward passes on one batch would count examples twice).
    """
    if not module.training:
        return
    if any(p.requires_grad and getattr(p, "grad_sample", None) is not None
           for p in module.parameters()):
        raise PrivacyStateError(
            "one forward and backward pass per step under Poisson sampling; got a forward pass "
            "while per-sample gradients of the last one are still held (p.grad_sample). "
            "Accumulated batches are not one Poisson batch. Call optimizer.step() and "
            "optimizer.zero_grad() (or model.zero_grad()) before the next batch.")
