"""Hooks that record, for every module owning trainable parameters, each forward call (its
inputs) and, during backward, the gradient of the loss with respect to its outputs.

Output gradients come from *tensor* hooks registered on the outputs inside the forward hook, not
from module backward hooks: a tensor hook registered before an in-place operation (``ReLU(
inplace=True)``, ``out += identity``) still receives the gradient with respect to the value the
module produced, so in-place activations just work (where a rule's backward node replaces
autograd's, ``engine.outputs.input_only()``, that node records the same gradient: no hook). When
autograd finishes the backward pass, a callback queued on its engine hands the completed
captures over in one list.

Nothing is stored on the module or its parameters: the recorder keeps its own list, cleared
after every backward pass, and removes its hooks through their handles on ``detach()``.

A call that sees one example while the rest of the forward pass sees ``B`` (position embeddings
built from ``arange(T).unsqueeze(0)``, as in BERT and GPT-2) is *broadcast*: its inputs and
outputs are expanded to ``B`` identical rows (none, for an empty batch) before anything uses
them, so the tensor hook receives each example's own output gradient instead of their sum, and
the rule sees an ordinary batch of ``B``. Only rules that declare it
(``broadcasts_batch_of_one``: embeddings) are broadcast: a
leading 1 on a linear or recurrent layer is more often a sequence-first tensor of length 1,
whose expansion would change the forward pass itself; such a call is refused instead.

Privacy:
    Broadcasting is exact when the batch-of-one output meets the batch through broadcasting
    arithmetic (``x + pos``, ``x * mask``), which is how such outputs are used. Code that instead
    indexes or reduces that output along dimension 0 (``pos[0]``, ``pos.sum(0)``) would send the
    whole batch's gradient through one row; compute such a tensor without a batch dimension of 1
    (or freeze the layer). A call whose batch is 1 before any call has seen ``B`` is not
    broadcast, and the pass is refused as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from privgrad.engine.compiled import eager, unwrapped
from privgrad.engine.outputs import input_only, joint, unviewed
from privgrad.errors import PrivacyStateError, UnsupportedModuleError
from privgrad.layers import Capture, LayerRule, RuleRegistry, speed_hooks, workspace
from privgrad.layers.base import tensor_inputs


def _inside_torch_func() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, ...): such forwards are someone
    else's computation (a reference, an analysis), not a training step, and are not recorded."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def trainable_names(module: nn.Module, children: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Names of the parameters the module registered itself that currently require grad, then
    those of ``children`` (as ``"child.name"``) that its rule serves."""
    return tuple(n for n, _ in trainable(module, children))


def trainable(module: nn.Module, children: tuple[str, ...] = ()) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of ``trainable_names()`` (one walk over the parameters)."""
    own = [(n, p) for n, p in module._parameters.items() if p is not None and p.requires_grad]
    return own + [
        (f"{c}.{n}", p) for c in children
        for n, p in module.get_submodule(c).named_parameters(recurse=False) if p.requires_grad]


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
        skip_parameter_grads: performance only: where the rule gives the input gradient alone
            ([`input_backward()`][privgrad.layers.speed.SpeedHooks.input_backward]), autograd forms
            no gradient for the module's parameters (their ``.grad`` stays untouched by backward).
            For private training, which overwrites those gradients anyway; see
            ``privgrad.engine.outputs``.
        early: ``capture -> bool``, asked once a capture's output gradients are all in: if
            true, its per-sample gradients are formed at once (``Capture.early``) and its
            tensors released (see ``privgrad.engine.batch.materialize_early()``).
        tag: ``() -> object``, stamped on every capture as ``Capture.tag`` (which drawn
            batch the call ran on).

    Attributes:
        checking: while true, every call takes autograd's own backward (no rule's input or
            joint backward, no graph-free forward), so that the parameters' ordinary gradients
            are formed for the engine's self-check. Set by the engine.
    """

    privgrad_hooks = True  # its hooks are privgrad's own (see _only_privgrad_hooks)

    def __init__(self, module: nn.Module, registry: RuleRegistry,
                 on_backward: Callable[[list[Capture]], None], *,
                 skip_parameter_grads: bool = False, early: Callable[[Capture], bool] | None = None,
                 tag: Callable[[], object] | None = None):
        self.module = module
        self.tag = tag
        self.checking = False
        self.early = early
        self.registry = registry
        self.on_backward = on_backward
        self.skip_parameter_grads = skip_parameter_grads
        self.paths = {m: name for name, m in module.named_modules(remove_duplicate=False)}
        self._rules: dict[nn.Module, LayerRule] = {}
        self._children: dict[nn.Module, tuple[str, ...]] = {}
        self._forward_batch: int | None = None  # batch of the first call in this forward pass
        # Held weakly: a capture lives as long as the graph that will deliver its output
        # gradients (autograd holds its hook), so a forward pass nobody backpropagates through
        # (a validation loop without torch.no_grad) is freed as it would be without privgrad.
        self._captures: list[weakref.ref[Capture]] = []
        self._handles: list = []
        self._callback_queued = False
        self._busy = False  # True while rules run: their own forward calls are not recorded
        # forwards running without a graph: (joint backward, context entered or None, scratch)
        self._graphless: dict[nn.Module, tuple] = {}

    # -- wiring ------------------------------------------------------------------------------
    def attach(self) -> None:
        """Hook every module that owns parameters (trainable now or possibly later)."""
        self._grad_hook, self._backward_end = eager(self._grad_hook), eager(self._backward_end)
        for m in {m for m in self.paths if any(True for _ in m.parameters(recurse=False))}:
            rule = self.registry.dedicated(m)
            graphless = rule is not None and speed_hooks(rule).forward_without_graph(m)
            if graphless:
                self._handles.append(m.register_forward_pre_hook(eager(self._graphless_starts),
                                                                 with_kwargs=True))
            # always_call: a graph-free forward that raises still gets grad mode back
            self._handles.append(m.register_forward_hook(eager(self._forward_hook), with_kwargs=True,
                                                         always_call=graphless))
            if rule is not None and rule.serves_children:
                self._children[m] = rule.serves_children
        self._handles.append(self.module.register_forward_pre_hook(eager(self._forward_starts)))

    def _forward_starts(self, module: nn.Module, args: tuple) -> None:
        self._forward_batch = None

    def _graphless_starts(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Run the module's forward without an autograd graph where its rule's
        [`joint_backward()`][privgrad.layers.speed.SpeedHooks.joint_backward] will replace the whole
        backward of the call (a recurrent layer: the native kernel's training forward, which also
        stores a workspace for its own backward, costs about 1.4x its inference forward). Only where
        nothing else could see the difference: no other hook on the module, no global module
        hook; the forward hook turns grad mode back on and attaches the rule's backward."""
        if (not self.fast_backward or self._busy or not torch.is_grad_enabled()
                or _inside_torch_func() or not _only_privgrad_hooks(module)
                or not trainable(module, self._children.get(module, ()))):
            return None
        if not self._only_first_input_needs_grad(args, tensor_inputs(args, kwargs)):
            return None
        speed = speed_hooks(self.rule_for(module))
        whole = speed.joint_backward(module, args, kwargs)
        if whole is None:
            return None
        scratch: dict = {}
        kept = speed.graphless_forward(module, args, kwargs, scratch)
        self._graphless[module] = (whole, kept, scratch)
        torch._C._set_grad_enabled(False)
        if kept is not None:
            kept.__enter__()
        return None

    @property
    def fast_backward(self) -> bool:
        """Whether rules may replace autograd's backward (see ``skip_parameter_grads``)."""
        return self.skip_parameter_grads and not self.checking

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._captures.clear()
        workspace.drop(self.paths)  # the rules' work arrays kept for the next step

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
    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        whole, kept, scratch = self._graphless.pop(module, (None, None, {}))
        if whole is not None:  # the forward ran without a graph (_graphless_starts)
            if kept is not None:
                kept.__exit__(None, None, None)
            torch._C._set_grad_enabled(True)
            if output is None:  # it raised; the error propagates
                return None
        if self._busy or not torch.is_grad_enabled() or _inside_torch_func():
            return None
        pairs = trainable(module, self._children.get(module, ()))
        if not pairs:
            return None
        names, params = tuple(n for n, _ in pairs), tuple(p for _, p in pairs)
        rule = self.rule_for(module)
        leaves, spec = ([output], None) if isinstance(output, torch.Tensor) else tree_flatten(output)
        index = tuple(
            i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and (
                x.requires_grad or (whole is not None and x.is_floating_point()))
        )
        if not index:
            return None
        batch, replaced = rule.batch_size(module, args, kwargs), None
        if self._forward_batch is None:
            self._forward_batch = batch
        elif batch == 1 != self._forward_batch and rule.broadcasts_batch_of_one and all(
                leaves[i].dim() and leaves[i].shape[0] == 1 for i in index):
            # (also to an empty batch: expanded to 0 rows, it contributes nothing, as it should)
            batch = self._forward_batch
            args, kwargs = tree_map(partial(_expand_one, batch), (args, kwargs))
            leaves = [_expand_one(batch, x) if i in index else x for i, x in enumerate(leaves)]
            replaced = _unflatten(leaves, spec)
        inputs = tensor_inputs(args, kwargs)
        backward = None
        if whole is None and self.fast_backward and self._only_first_input_needs_grad(
                args, inputs):
            if len(index) == 1:
                backward = speed_hooks(rule).input_backward(module, args, kwargs)
            if backward is None:
                whole = speed_hooks(rule).joint_backward(module, args, kwargs)
        if backward is None and whole is None and any(leaves[i]._is_view() for i in index):
            leaves = [unviewed(x) if i in index and x._is_view() else x
                      for i, x in enumerate(leaves)]
            replaced = _unflatten(leaves, spec)
        capture = Capture(
            module=module,
            args=args,
            kwargs=kwargs,
            batch_size=batch,
            names=names,
            output_index=index,
            grad_outputs=[None] * len(index),
            versions=tuple(x._version for x in inputs),
            rule=rule,
            output_like=[(leaves[i].shape, leaves[i].dtype, leaves[i].device) for i in index],
            params=params,
            outputs=[leaves[i].detach() for i in index] if whole is not None else [],
            scratch=scratch,
            tag=self.tag() if self.tag is not None else None,
        )
        if backward is not None:
            i = index[0]  # its node records the output gradient, as the tensor hook would
            leaves[i] = input_only(leaves[i], args[0], params[0], backward,
                                   record=partial(self._grad_hook, capture, 0))
            replaced = _unflatten(leaves, spec)
        elif whole is not None:  # one backward for all outputs (the capture is its context)
            def backward_all(grads, needs_x, capture=capture, whole=whole):
                capture.grad_outputs = list(grads)
                return whole(capture, needs_x)

            for i, y in zip(index, joint([leaves[i] for i in index], args[0], params[0],
                                         backward_all)):
                leaves[i] = y
            replaced = _unflatten(leaves, spec)
        if not self.checking:
            speed_hooks(rule).keep_from_forward(module, [leaves[i] for i in index], scratch)
        self._captures.append(weakref.ref(capture))
        if backward is None:
            for slot, i in enumerate(index):
                leaves[i].register_hook(partial(self._grad_hook, capture, slot))
        return replaced  # None keeps the module's own output

    @staticmethod
    def _only_first_input_needs_grad(args, inputs) -> bool:
        """Whether a rule's own backward may replace autograd's for this call: the first input
        is a tensor and no other input needs its gradient."""
        if not args or not isinstance(args[0], torch.Tensor):
            return False
        return not any(x.requires_grad and x is not args[0] for x in inputs)

    def _grad_hook(self, capture: Capture, slot: int, grad: torch.Tensor) -> None:
        if capture.output_like is None:  # its backward pass has ended: this is another one
            path = self.paths.get(capture.module, type(capture.module).__name__)
            raise PrivacyStateError(
                f"one backward pass per forward pass is allowed; got a second backward pass "
                f"through module {path} ({type(capture.module).__name__}) after the first had "
                f"ended (backward(retain_graph=True), then backward() again). Its examples were "
                f"already clipped once; a second pass would clip them twice and double their "
                f"sensitivity. Combine the losses into one before a single backward(), or run a "
                f"new forward pass.")
        capture.grad_outputs[slot] = grad
        if (self.early is not None and all(g is not None for g in capture.grad_outputs)
                and self.early(capture)):
            self._materialize_now(capture)
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _materialize_now(self, capture: Capture) -> None:
        """Form the capture's per-sample gradients now and let go of the tensors they came from."""
        self._check_inputs_unchanged(capture)
        self._busy = True
        try:
            early = capture.rule.per_sample_gradients(capture.module, capture, capture.names)
        finally:
            self._busy = False
        capture.release()
        capture.early = early

    def _backward_end(self) -> None:
        self._callback_queued = False
        self._forward_batch = None
        captures = [c for c in (ref() for ref in self._captures) if c is not None]
        self._captures = []
        done = []
        for c in captures:
            if c.early is not None:  # formed during the pass; inputs checked then
                c.output_like = None
                done.append(c)
                continue
            if all(g is None for g in c.grad_outputs):
                # Recorded, but the loss does not depend on it (a BERT pooler whose output is
                # unused): let it go. (The capture keeps only its outputs' shapes: holding the
                # outputs themselves made a cycle with their hooks through autograd's C++ side,
                # invisible to the garbage collector, which kept every step's graph alive.)
                c.output_like = None
                continue
            c.grad_outputs = [
                g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                for g, (shape, dtype, device) in zip(c.grad_outputs, c.output_like)
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
        now = tuple(x._version for x in tensor_inputs(capture.args, capture.kwargs))
        if now != capture.versions:
            path = self.paths.get(capture.module, type(capture.module).__name__)
            raise PrivacyStateError(
                f"an input of module {path} ({type(capture.module).__name__}) was modified in "
                f"place after the module used it, so its per-sample gradients cannot be computed "
                f"from it. Replace the in-place operation that follows {path} with an "
                f"out-of-place one (e.g. x = x + y instead of x += y).")


def _privgrads(hook) -> bool:
    """Whether a module hook is a method of one of privgrad's own hook owners."""
    return getattr(getattr(unwrapped(hook), "__self__", None), "privgrad_hooks", False)


def _only_privgrad_hooks(module: nn.Module) -> bool:
    """Whether the module has no forward or backward hooks but privgrad's own (the recorder's and
    the state guard's), and no global module hooks are installed."""
    glob = torch.nn.modules.module
    return (all(_privgrads(h) for h in module._forward_pre_hooks.values())
            and all(_privgrads(h) for h in module._forward_hooks.values())
            and not module._backward_hooks and not module._backward_pre_hooks
            and not (glob._global_forward_pre_hooks or glob._global_forward_hooks
                     or glob._global_backward_hooks or glob._global_backward_pre_hooks))


def _unflatten(leaves: list, spec):
    """Inverse of the forward hook's flattening (``spec`` is ``None`` for a single tensor)."""
    return leaves[0] if spec is None else tree_unflatten(leaves, spec)


def _expand_one(batch: int, x):
    """``x`` with a leading dimension of 1 expanded (a view) to ``batch`` rows; others as is."""
    if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    return x
