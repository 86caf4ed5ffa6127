"""What a rule may add to be faster: the opt-in speed hooks, kept apart from the privacy contract.

[`LayerRule`][privgrad.LayerRule] says what decides correctness: per-sample gradients,
ghost norms and weighted sums, masking, the batch dimension, what the validator reports. The
members here change how much a step costs and nothing else: a rule that inherits
[`SpeedHooks`][privgrad.layers.speed.SpeedHooks] (``class MyRule(SpeedHooks, LayerRule)``) overrides
those it can serve, and a rule that does not gets the engine's defaults (autograd's own backward,
the module's own forward, per-sample gradients formed at the end of the pass, and, where it has a
ghost norm, materialising in the ``"auto"`` mode). The engine asks through ``speed_hooks()``, never
assuming a rule has them.

Privacy:
    None of these members may change a number the private step uses: the hooks replace
    autograd's work by the same values (the input gradient, the forward's outputs) or move
    work in time, and the cost estimates only choose between two exact methods. The engine's
    self-check runs with every hook off (``checking``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from privgrad.layers.base import Capture, LayerRule

__all__ = ["SpeedHooks", "speed_hooks"]


class SpeedHooks:
    """Opt-in speed hooks of a layer rule; the defaults change nothing.

    A mixin: list it before [`LayerRule`][privgrad.LayerRule] among a rule's bases and
    override what the rule can do faster than the defaults.
    """

    #: Whether ``per_sample_gradients()`` may run during the
    #: backward pass, from a hook, as soon as the call's output gradients are in (plain tensor
    #: arithmetic: no autograd, no module calls). The engine then does so where the result is
    #: smaller than the capture.
    materializes_early: ClassVar[bool] = False

    def input_backward(self, module: nn.Module, args: tuple, kwargs: dict):
        """The gradient of the first input alone, for private training.

        Returns a function ``grad_output -> gradient of args[0]`` that forms no parameter
        gradient, or ``None`` (the default) to keep autograd's own backward for this call. The
        engine uses it to skip the parameter gradients that private training discards (see
        ``privgrad.engine.outputs``); it is only asked when ``args[0]`` is the only tensor
        input that requires grad.
        """
        return None

    def joint_backward(self, module: nn.Module, args: tuple, kwargs: dict):
        """One backward for the whole call, for private training (any number of outputs).

        Returns a function ``(capture, needs_input_grad) -> gradient of args[0]`` (``None`` when not
        needed), called during backward once ``capture.grad_outputs`` holds the call's output
        gradients; it may leave in ``capture.scratch`` what the rule's own methods would compute
        from them again. Or ``None`` (the default) to keep autograd's backward. Asked under the same
        conditions as [`input_backward()`][privgrad.layers.speed.SpeedHooks.input_backward], which a
        single-output rule should prefer.
        """
        return None

    def forward_without_graph(self, module: nn.Module) -> bool:
        """Whether the module's forward may run without an autograd graph when
        [`joint_backward()`][privgrad.layers.speed.SpeedHooks.joint_backward] serves the call (it
        then needs nothing autograd would save, and the forward calls no other module). Default
        ``False``."""
        return False

    def graphless_forward(self, module: nn.Module, args: tuple, kwargs: dict, scratch: dict):
        """A context manager to run the module's graph-free forward under (see
        [`forward_without_graph()`][privgrad.layers.speed.SpeedHooks.forward_without_graph]), or
        ``None`` (the default: the module's forward as it is). Under it the rule may compute the
        forward itself, as long as it returns exactly what the module's own forward returns, and
        keep in ``scratch`` (which becomes the call's ``scratch``) what its joint backward would
        otherwise recompute."""
        return None

    def keep_from_forward(self, module: nn.Module, outputs: list, scratch: dict) -> None:
        """Keep in ``scratch`` (which becomes the call's ``capture.scratch``) what the
        forward's own autograd node saved and the rule's methods would otherwise compute again
        from the input, e.g. GroupNorm's per-group mean and reciprocal standard deviation.
        Called once, when the call is captured, with its hooked output tensors (not while the
        engine self-checks). The values kept must be the very ones a recomputation gives.
        Default: nothing."""

    # -- the cost model: which exact method the "auto" mode picks for one call ----------------
    def ghost_cost(self, module: nn.Module, capture: Capture) -> float:
        """Approximate multiply-adds of the ghost norm for this call (default: infinite, so
        that ``"auto"`` materialises)."""
        return float("inf")

    def materialize_cost(self, module: nn.Module, capture: Capture) -> float:
        """Approximate multiply-adds of materialising per-sample gradients for this call."""
        return 0.0


_DEFAULTS = SpeedHooks()


def speed_hooks(rule: LayerRule) -> SpeedHooks:
    """The rule's speed hooks: the rule itself where it inherits
    [`SpeedHooks`][privgrad.layers.speed.SpeedHooks], else the defaults (which change nothing)."""
    return rule if isinstance(rule, SpeedHooks) else _DEFAULTS
