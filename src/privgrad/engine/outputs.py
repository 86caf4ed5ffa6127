"""What the recorder's forward hook hands back in place of a module's output.

Both functions return a tensor with the module's own output values, on the same storage and
sharing its version counter (so autograd's checks for in-place modification of a saved tensor
still fire), but with a ``grad_fn`` of privgrad's:

- ``unviewed()``: identity in backward. For an output that is a *view* (``nn.Linear`` on an
  input with more than two dimensions returns one): an in-place operation on a view rewrites
  its autograd history, and a tensor hook registered on the view before would never fire, so
  the layer's output gradient would be lost. The replacement is not a view, so its hook fires.
- ``input_only()``: backward computes only the gradient of the module's first input, with the
  rule's formula ([`input_backward()`][privgrad.layers.speed.SpeedHooks.input_backward]);
  ``joint()`` does the same for a module with several outputs
  ([`joint_backward()`][privgrad.layers.speed.SpeedHooks.joint_backward]). Private training
  overwrites ``p.grad`` of every privatised parameter with the noisy clipped sum, so the parameter
  gradients autograd would form (for a Linear or Conv layer as much work as the forward pass) are
  never used; with this backward they are never computed, and ``p.grad`` of the layer's parameters
  stays as it was until the optimizer step writes the private gradient. The module's own graph for
  the call is no longer referenced and is freed at once.

Nothing is wrapped or patched: returning a replacement output is what a forward hook may do.

Privacy:
    Neither changes what is released: the private step writes ``p.grad`` for every privatised
    parameter whether or not autograd filled it. ``input_only()`` applies only where the rule
    gives the input gradient and the first input is the only tensor input requiring grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _Unviewed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output):  # noqa: D102 - torch.autograd.Function API
        return output.detach()  # a new tensor object on the same storage, not a view

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102 - torch.autograd.Function API
        return grad_output


class _RuleBackward(torch.autograd.Function):
    """Identity on ``outputs``; backward: ``backward(grad_outputs, needs_x)`` gives the gradient
    of ``x`` (or ``None``), and nothing else gets one.

    ``anchor`` is one of the layer's trainable parameters: it makes the results require grad
    when ``x`` does not (a first layer), and receives no gradient.
    """

    @staticmethod
    def forward(ctx, backward, anchor, x, *outputs):  # noqa: D102 - torch.autograd.Function API
        ctx.rule_backward = backward
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):  # noqa: D102 - torch.autograd.Function API
        needs_x = ctx.needs_input_grad[2]
        grad_x = ctx.rule_backward(grad_outputs, needs_x)
        return (None, None, grad_x if needs_x else None, *([None] * len(grad_outputs)))


def unviewed(output: torch.Tensor) -> torch.Tensor:
    """``output`` as a tensor that is not a view, with the same values and gradient."""
    return _Unviewed.apply(output)


def input_only(output: torch.Tensor, x, anchor: torch.Tensor,
               input_grad: Callable[[torch.Tensor], torch.Tensor],
               record: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """``output``'s values with a backward that only computes the gradient of ``x``.

    Args:
        output: the module's output (its own autograd graph is dropped).
        x: the module's first input (an index tensor gets no gradient).
        anchor: a parameter of the module that requires grad.
        input_grad: ``grad_output -> gradient of x`` (the rule's formula), called only when
            ``x`` needs a gradient.
        record: called first with the output gradient (what a tensor hook on ``output`` would
            receive): the recorder's capture of it.
    """
    def backward(grads, needs_x):
        record(grads[0])
        return input_grad(grads[0]) if needs_x else None

    return joint([output], x, anchor, backward)[0]


def joint(outputs: list[torch.Tensor], x, anchor: torch.Tensor,
          backward: Callable[[tuple, bool], torch.Tensor | None]) -> list[torch.Tensor]:
    """``outputs``' values with one backward for all of them that computes only the gradient
    of ``x``: ``backward(grad_outputs, needs_x)`` (zeros for outputs the loss does not reach;
    ``needs_x`` False for a first layer, whose input needs no gradient).

    ``input_only()`` for a module with several outputs (a recurrent layer's sequence, ``h_n``
    and ``c_n``); the module's own graph for the call is dropped.
    """
    return list(_RuleBackward.apply(backward, anchor, x, *(o.detach() for o in outputs)))
