"""The optimizer ``make_private`` returns: a view over the user's own optimizer.

Opacus returns a ``DPOptimizer`` that wraps the user's optimizer and does the private step
itself. privgrad never wraps the optimizer: the user's optimizer object is the one that steps,
and privgrad's step pre-hook on it writes the private gradient (house rule 1). Opacus code still
reads attributes off the returned object (``optimizer.noise_multiplier``,
``optimizer.expected_batch_size``, ``optimizer.original_optimizer``), so ``make_private`` returns
a ``PrivateOptimizer``: a ``torch.optim.Optimizer`` that holds no state of its own. Every
call and every piece of state (``param_groups``, ``state``, ``defaults``, ``step``,
``zero_grad``, ``state_dict``, hooks, any other attribute) goes to
``optimizer.original_optimizer``, the user's object, so an LR scheduler built on either object
drives the same ``param_groups``.

The privacy attributes are read-only properties that read the engine's settings (stored once,
in the engine): Opacus lets code assign ``optimizer.noise_multiplier`` mid-run; privgrad fixes
the noise when the guarantee is set, so an assignment is an error, not a silent no-op.
"""

from __future__ import annotations

import torch

from privgrad import _validate
from privgrad.errors import PrivacyStateError

__all__ = ["OptimizerView", "PrivateOptimizer"]


class OptimizerView(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that forwards everything to ``original_optimizer``.

    Args:
        optimizer: the optimizer to forward to (kept as ``original_optimizer``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):  # no super().__init__: no own state
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise _validate.fail("optimizer must be a torch.optim.Optimizer", "optimizer",
                                 type(optimizer).__name__, "Pass your optimizer.")
        object.__setattr__(self, "original_optimizer", optimizer)

    # -- the state is the original's ---------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.original_optimizer.defaults = value

    # -- the calls are the original's --------------------------------------------------------
    def step(self, closure=None):
        """The original optimizer's ``step`` (privgrad's step pre-hook runs on it)."""
        if closure is None:
            return self.original_optimizer.step()
        return self.original_optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def register_step_pre_hook(self, hook):
        return self.original_optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.original_optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.original_optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.original_optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.original_optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.original_optimizer.register_load_state_dict_post_hook(hook, prepend)

    def __getattr__(self, name: str):  # only for names not found on the view itself
        if name == "original_optimizer":  # (unpickling: not set yet)
            raise AttributeError(name)
        return getattr(self.original_optimizer, name)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.original_optimizer!r})"


class PrivateOptimizer(OptimizerView):
    """What ``privgrad.opacus.PrivacyEngine.make_private`` returns as the optimizer.

    Args:
        optimizer: the user's optimizer, under the privacy engine's step hooks.
        engine: the ``privgrad.PrivacyEngine`` attached to it.
        world_size: processes in the data-parallel job (1 when training alone).

    Attributes:
        noise_multiplier: sigma (read-only, as are the four below).
        max_grad_norm: C (a list under per-layer clipping, as passed).
        expected_batch_size: the expected batch size *per process* (Opacus's meaning): the
            job's expected batch size over ``world_size``.
        loss_reduction: ``"mean"`` or ``"sum"``.
        privacy_engine: the ``privgrad.PrivacyEngine``.

    Privacy:
        Nothing here changes the mechanism: the step is the original optimizer's, privatised by
        the engine's hooks. The attributes read the engine's settings.
    """

    _READ_ONLY = frozenset({"noise_multiplier", "max_grad_norm", "expected_batch_size",
                            "loss_reduction", "privacy_engine"})

    def __init__(self, optimizer: torch.optim.Optimizer, engine, world_size: int = 1):
        super().__init__(optimizer)
        object.__setattr__(self, "privacy_engine", engine)
        object.__setattr__(self, "_world_size", world_size)

    @property
    def noise_multiplier(self) -> float:
        return self.privacy_engine.settings.noise_multiplier

    @property
    def max_grad_norm(self):
        bound = self.privacy_engine.settings.max_grad_norm
        return list(bound) if isinstance(bound, tuple) else bound

    @property
    def expected_batch_size(self) -> float:
        return self.privacy_engine.settings.expected_batch_size / self._world_size

    @property
    def loss_reduction(self) -> str:
        return self.privacy_engine.settings.loss_reduction

    def __setattr__(self, name: str, value) -> None:
        if name in self._READ_ONLY:
            raise PrivacyStateError(
                f"the privacy settings are fixed when make_private sets the guarantee; got "
                f"optimizer.{name}={value!r}. Start a new run with make_private(...) on a new "
                f"PrivacyEngine to train with other settings.")
        object.__setattr__(self, name, value)
