"""What a layer rule is, and the record of one module call that it works on.

A *rule* turns one call of a module (its inputs, and the gradient of the loss with respect to its
output) into per-sample gradients of that module's own parameters, or, where cheaper, into
per-sample gradient norms plus the weighted sum of per-sample gradients computed straight from the
stored inputs and output gradients (book-keeping, Bu et al. 2023). The engine never needs anything
else from a layer, so a custom layer is supported by one small subclass of
[`LayerRule`][privgrad.LayerRule]. That class is the privacy contract: everything here decides which
numbers the private step uses. What only makes a rule faster (its own backward, a graph-free
forward, early materialisation, the cost model) is the opt-in mixin
[`SpeedHooks`][privgrad.layers.speed.SpeedHooks].

Conventions: ``b`` indexes the examples of the batch. Every tensor a rule returns is per parameter
name (the name under which the module itself registered it, e.g. ``"weight"``, or
``"child.weight"`` for a child listed in ``LayerRule.serves_children``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from privgrad._precision import accumulation_dtype

__all__ = ["Capture", "LayerFinding", "LayerRule", "batched_size", "tensor_inputs"]


def batched_size(module: nn.Module, x: torch.Tensor, min_dim: int) -> int:
    """``x.shape[0]``, after checking that ``x`` has a batch dimension (``>= min_dim`` dims)."""
    if x.dim() < min_dim:
        from privgrad.errors import UnsupportedModuleError

        raise UnsupportedModuleError(
            f"{type(module).__name__} needs a batch dimension (an input of at least {min_dim} "
            f"dimensions); got an input of shape {tuple(x.shape)}. Add the batch dimension "
            f"(x.unsqueeze(0)).")
    return int(x.shape[0])


def tensor_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among a call's inputs, in ``tree_leaves`` order (fast for plain calls)."""
    if not kwargs and all(isinstance(x, torch.Tensor) for x in args):
        return list(args)
    return [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


@dataclass
class Capture:
    """One call of one module during a forward pass, and its output gradients after backward.

    Attributes:
        module: the module that was called.
        args: positional inputs of the call, as passed.
        kwargs: keyword inputs of the call, as passed.
        output_index: positions, among the leaves of the flattened output, of the output tensors
            that required grad (and so were hooked).
        grad_outputs: gradient of the loss for each of those outputs, in the same order; zeros
            where autograd produced none.
        batch_size: number of examples in the call (the rule's
            [`LayerRule.batch_size()`][privgrad.LayerRule.batch_size]).
        names: the module's own parameters that required grad at the time of the call.
        versions: ``_version`` counters of the tensor inputs at capture time, to detect an input
            that was modified in place before backward used it.
        rule: the rule serving the module (engine bookkeeping).
        output_like: ``(shape, dtype, device)`` of the hooked outputs until backward ends
            (engine bookkeeping, to build zero gradients for outputs autograd did not reach).
        scratch: the rule's own per-call working space (e.g. a recomputation that both the norm
            and the weighted sum need), dropped with the capture after the step. A
            ``Lease`` under ``"lease"`` is given back then.
        params: the parameters that ``names`` named at the time of the call, in the same order
            (engine bookkeeping; empty where the capture was built without them).
        early: per-sample gradients ``{name: (batch, *shape)}`` formed during the backward
            pass (``privgrad.engine.batch.materialize_early()``); then everything else is
            released ([`release()`][privgrad.layers.base.Capture.release]). ``None`` otherwise.
        outputs: the values (detached) of the hooked outputs, in ``output_index`` order, kept
            until the step for a call that a rule's
            [`joint_backward()`][privgrad.layers.speed.SpeedHooks.joint_backward] serves (a
            recurrent rule reads every step's state from them instead of recomputing it); empty
            otherwise.
        tag: which drawn batch the call ran on (engine bookkeeping: the number of batches the
            private loader had yielded when the call was made), or ``None``.
    """

    module: nn.Module
    args: tuple
    kwargs: dict
    batch_size: int
    names: tuple = ()
    output_index: tuple = ()
    grad_outputs: list = field(default_factory=list)
    versions: tuple = ()
    rule: LayerRule | None = None
    output_like: list | None = None
    scratch: dict = field(default_factory=dict)
    params: tuple = ()
    outputs: list = field(default_factory=list)
    early: dict | None = None
    tag: object = None
    #: engine bookkeeping: ``(mode, uses ghost norms)`` once the method is chosen for this call
    method: tuple | None = None

    def release(self) -> None:
        """Let go of every tensor of the call (inputs, output gradients, per-sample gradients,
        the rule's scratch), once what needed them is done. Autograd keeps the capture itself
        alive while the graph lives (its hooks refer to it), and a training loop that keeps the
        last ``loss`` keeps the graph until its next forward pass."""
        lease = self.scratch.get("lease")
        if lease is not None:  # the rule's work arrays: the module's next call reuses them
            lease.give_back()
        self.args, self.kwargs, self.grad_outputs = (), {}, []
        self.scratch, self.outputs, self.early = {}, [], None

    def kept(self, key: str, compute):
        """``scratch[key]``, from ``compute()`` on first use: what a rule's norm and its weighted
        sum both need is formed once a call (a masked copy of the capture starts empty)."""
        if key not in self.scratch:
            self.scratch[key] = compute()
        return self.scratch[key]

    def tensors(self) -> list[torch.Tensor]:
        """The call's tensors: its output gradients, then its inputs (``tree_leaves`` order)."""
        return ([g for g in self.grad_outputs if isinstance(g, torch.Tensor)]
                + tensor_inputs(self.args, self.kwargs))

    @property
    def activation(self) -> torch.Tensor:
        """The first positional input (the activation, for single-input layers)."""
        return self.args[0]

    @property
    def grad_output(self) -> torch.Tensor:
        """The gradient of the (single) output; zeros if autograd produced none."""
        return self.grad_outputs[0]


@dataclass(frozen=True)
class LayerFinding:
    """What a layer family finds wrong with one module's configuration: the ``problem``, ``why``
    it matters for privacy, the ``fix``, and whether ``privgrad.fix(model)`` applies it
    (``fixable``). ``privgrad.validate`` reports it as a ``privgrad.validation.Finding`` with the
    module's path and type."""

    problem: str
    why: str
    fix: str
    fixable: bool = False


class LayerRule:
    """Per-sample gradients, and optionally cheap per-sample norms, for one layer family.

    Subclasses implement [`per_sample_gradients()`][privgrad.LayerRule.per_sample_gradients]. A rule
    that can get per-sample norms without materialising per-sample gradients (a *ghost* norm) sets
    ``has_ghost_norm = True`` and implements [`ghost_norms_sq()`][privgrad.LayerRule.ghost_norms_sq]
    and [`weighted_sum()`][privgrad.LayerRule.weighted_sum]; the cost estimates that let the engine
    pick the cheaper exact method per call are speed hooks
    ([`SpeedHooks`][privgrad.layers.speed.SpeedHooks]: without them ``"auto"`` materialises).

    Privacy:
        A rule must be *exact*: the i-th row it returns is the gradient of example i's own loss,
        and depends on no other example. The test suite checks every built-in rule against
        ``torch.func`` and a one-example-at-a-time loop; check a custom rule the same way with
        [`privgrad.testing.check_rule()`][privgrad.testing.check_rule].
    """

    has_ghost_norm: ClassVar[bool] = False
    #: Whether a call with a batch of one, made after the forward pass has seen ``B`` examples,
    #: is a table shared by the batch (position embeddings of ``arange(T).unsqueeze(0)``) whose
    #: output the engine expands to ``B`` rows (see ``privgrad.engine.capture``). Only for
    #: rules whose batch-of-one inputs are such tables: expanding a sequence-first tensor of
    #: length 1 instead would change the forward pass.
    broadcasts_batch_of_one: ClassVar[bool] = False
    #: Children whose parameters this rule also serves (as ``"child.name"``), because the module
    #: applies them itself instead of calling the child (``nn.MultiheadAttention.out_proj``).
    serves_children: ClassVar[tuple[str, ...]] = ()
    #: Whether the per-sample gradient is a sum over every dimension between the batch and the
    #: features of batch-major inputs and output gradients, so that a user's examples stacked
    #: as ``(users, examples, ...)`` give the user's summed gradient as one example's
    #: (user-level clipping, ``privgrad.engine.groups``: the ghost norm then extends to users
    #: for free). Without it the engine materialises per-example gradients and adds them up by
    #: user, which is exact for any rule.
    stacks_examples: ClassVar[bool] = False

    def check(self, module: nn.Module) -> str | None:
        """Return why this module's configuration is unsupported, or ``None`` if it is fine."""
        return None

    def finding(self, module: nn.Module) -> LayerFinding | None:
        """What the validator reports about this module, or ``None``: by default, the reason
        [`check()`][privgrad.LayerRule.check] gives, with the generic why and fix. Override it to
        say more."""
        reason = self.check(module)
        if reason is None:
            return None
        return LayerFinding(
            reason, "its per-sample gradients cannot be computed exactly as configured",
            "change the configuration as described, or freeze the module")

    def batch_size(self, module: nn.Module, args: tuple, kwargs: dict) -> int:
        """Number of examples in a call (default: size of the first input's first dimension)."""
        return batched_size(module, args[0], 1)

    def batch_dim(self, module: nn.Module) -> int | None:
        """The batch dimension of the module's tensor inputs and outputs: 0 (the default), 1 for
        sequence-first layers, ``None`` where it differs between them. The engine broadcasts a
        batch-of-one call to the forward pass's batch only when this is 0."""
        return 0

    def masked(self, capture: Capture, keep: torch.Tensor) -> Capture:
        """A copy of ``capture`` in which dropped examples (``keep[b]`` False) contribute zero.

        The default zeroes the rows of every batch-major floating tensor (inputs and output
        gradients). A rule whose tensors are not all batch-major overrides it.
        """
        b = capture.batch_size

        def zero_rows(x):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() and x.shape[0] == b:
                return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x,
                                   torch.zeros((), dtype=x.dtype, device=x.device))
            return x

        return Capture(
            module=capture.module, args=tree_map(zero_rows, capture.args),
            kwargs=tree_map(zero_rows, capture.kwargs), batch_size=b, names=capture.names,
            output_index=capture.output_index,
            grad_outputs=[zero_rows(g) for g in capture.grad_outputs], rule=capture.rule,
            tag=capture.tag,
        )

    def per_sample_gradients(
        self, module: nn.Module, capture: Capture, names: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``{name: tensor of shape (batch, *param.shape)}``."""
        raise NotImplementedError

    # -- ghost norms (optional) ------------------------------------------------------------
    def ghost_norms_sq(
        self, module: nn.Module, capture: Capture, names: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """Squared per-sample gradient norms ``{name: (batch,)}`` without materialising."""
        raise NotImplementedError

    def weighted_sum(
        self, module: nn.Module, capture: Capture, names: tuple[str, ...], weights: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``sum_b weights[b] * per_sample_gradient[b]`` for each name, from the stored tensors.

        The default materialises per-sample gradients; rules with a ghost norm override it
        with one contraction of inputs and output gradients.
        """
        grads = self.per_sample_gradients(module, capture, names)
        return {n: torch.einsum("b,b...->...", weights.to(g.dtype), g) for n, g in grads.items()}

    def sparse_weighted_sum(
        self, module: nn.Module, capture: Capture, names: tuple[str, ...], weights: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """[`weighted_sum()`][privgrad.LayerRule.weighted_sum] as sparse COO tensors, for parameters
        whose per-sample gradients touch few rows (embeddings), or ``None`` (the default: the engine
        calls [`weighted_sum()`][privgrad.LayerRule.weighted_sum]). The private step adds such sums
        straight into the noise."""
        return None

    # helpers ------------------------------------------------------------------------------
    @staticmethod
    def norm_dtype(t: torch.Tensor) -> torch.dtype:
        """Dtype for norm arithmetic: at least float32 (bf16/fp16 inputs are upcast)."""
        return accumulation_dtype(t.dtype)

