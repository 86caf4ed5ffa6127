"""Hooks that record, for every module owning trainable parameters, each forward call (its
inputs) and, during backward, the gradient of the loss with respect to its outputs.

Output gradients come from *tensor* hooks registered on the outputs inside the forward hook, not
from module backward hooks: a tensor hook registered before an in-place operation (``ReLU(
inplace=True)``, ``out += identity``) still receives the gradient with respect to the value the
module produced, so in-place activations just work. When autograd finishes the backward pass, a
callback queued on its engine hands the completed captures over in one list.

Nothing is stored on the module or its parameters: the recorder keeps its own list, cleared
after every backward pass, and removes its hooks through their handles on :meth:`detach`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from privgrad.errors import PrivacyStateError, UnsupportedModuleError
from privgrad.layers import Capture, LayerRule, RuleRegistry


def _inside_torch_func() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, ...): such forwards are someone
    else's computation (a reference, an analysis), not a training step, and are not recorded."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def trainable_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the parameters the module registered itself that currently require grad."""
    return tuple(n for n, p in module.named_parameters(recurse=False) if p.requires_grad)


def unsupported_message(path: str, module: nn.Module, reason: str) -> str:
    return (
        f"module {path or '<root>'} ({type(module).__name__}) has trainable parameters that no "
        f"per-sample rule can handle: {reason}. Fixes: (1) write a rule for it, one small file "
        f"(see docs/custom_layers.md) passed as rules=RuleRegistry.default().with_rule("
        f"{type(module).__name__}, MyRule()); (2) freeze it: {path or 'model'}"
        f".requires_grad_(False); (3) use the generic torch.func rule (rules=RuleRegistry."
        f"default(), the default)."
    )


class Recorder:
    """Records module calls and output gradients for one module tree.

    Args:
        module: the root module (the user's own object; only hooks are added).
        registry: the rules to use.
        on_backward: called once at the end of every backward pass that reached a recorded
            output, with the list of completed captures.
    """

    def __init__(
        self,
        module: nn.Module,
        registry: RuleRegistry,
        on_backward: Callable[[list[Capture]], None],
    ):
        self.module = module
        self.registry = registry
        self.on_backward = on_backward
        self.paths = {m: name for name, m in module.named_modules(remove_duplicate=False)}
        self._rules: dict[nn.Module, LayerRule] = {}
        self._captures: list[Capture] = []
        self._handles: list = []
        self._callback_queued = False
        self._busy = False  # True while rules run: their own forward calls are not recorded

    # -- wiring ------------------------------------------------------------------------------
    def attach(self) -> None:
        """Hook every module that owns parameters (trainable now or possibly later)."""
        for m in {m for m in self.paths if any(True for _ in m.parameters(recurse=False))}:
            self._handles.append(m.register_forward_hook(self._forward_hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._captures.clear()

    def rule_for(self, module: nn.Module) -> LayerRule:
        """The rule for ``module`` (cached); raises if there is none or it refuses the module."""
        rule = self._rules.get(module)
        if rule is None:
            path = self.paths.get(module, type(module).__name__)
            rule = self.registry.lookup(module)
            if rule is None:
                raise UnsupportedModuleError(
                    unsupported_message(path, module, "no dedicated rule, and generic rules are off"))
            reason = rule.check(module)
            if reason is not None:
                raise UnsupportedModuleError(unsupported_message(path, module, reason))
            self._rules[module] = rule
        return rule

    # -- hooks -------------------------------------------------------------------------------
    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._busy or not torch.is_grad_enabled() or _inside_torch_func():
            return
        names = trainable_names(module)
        if not names:
            return
        rule = self.rule_for(module)
        leaves, _ = tree_flatten(output)
        index = tuple(
            i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad
        )
        if not index:
            return
        inputs, _ = tree_flatten((args, kwargs))
        capture = Capture(
            module=module,
            args=args,
            kwargs=kwargs,
            batch_size=rule.batch_size(module, args, kwargs),
            names=names,
            output_index=index,
            grad_outputs=[None] * len(index),
            versions=tuple(x._version for x in inputs if isinstance(x, torch.Tensor)),
            rule=rule,
            output_like=[leaves[i] for i in index],
        )
        self._captures.append(capture)
        for slot, i in enumerate(index):
            leaves[i].register_hook(partial(self._grad_hook, capture, slot))

    def _grad_hook(self, capture: Capture, slot: int, grad: torch.Tensor) -> None:
        capture.grad_outputs[slot] = grad
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _backward_end(self) -> None:
        self._callback_queued = False
        captures, self._captures = self._captures, []
        done = []
        for c in captures:
            if all(g is None for g in c.grad_outputs):
                continue  # recorded, but not part of this backward pass (e.g. an eval forward)
            c.grad_outputs = [
                g if g is not None else torch.zeros_like(o)
                for g, o in zip(c.grad_outputs, c.output_like)
            ]
            c.output_like = None
            self._check_inputs_unchanged(c)
            done.append(c)
        if done:
            self._busy = True
            try:
                self.on_backward(done)
            finally:
                self._busy = False

    def _check_inputs_unchanged(self, capture: Capture) -> None:
        inputs, _ = tree_flatten((capture.args, capture.kwargs))
        now = tuple(x._version for x in inputs if isinstance(x, torch.Tensor))
        if now != capture.versions:
            path = self.paths.get(capture.module, type(capture.module).__name__)
            raise PrivacyStateError(
                f"an input of module {path} ({type(capture.module).__name__}) was modified in "
                f"place after the module used it, so its per-sample gradients cannot be computed "
                f"from it. Replace the in-place operation that follows {path} with an "
                f"out-of-place one (e.g. x = x + y instead of x += y).")
