"""``torch.compile``: privgrad's module hooks run eagerly inside a compiled forward pass.

Dynamo would otherwise trace the hooks into the graph, and the tensor hooks they register on
layer outputs, the list of captures they fill and the state checks they make would not happen
as written (measured: a compiled model's backward pass then reached none of them, and the first
``optimizer.step()`` was refused). Each hook is wrapped in ``torch.compiler.disable``: the
graph breaks at the hook, the hook runs in Python on real tensors, and the layer computations
between hooks are compiled. The tensor hooks and the end-of-backward callback are wrapped too,
so that a compiled *training step* (whose backward pass runs under Dynamo's frame callback)
keeps them out of its trace as well; the optimizer's step hooks likewise. The wrapper is made when the hooks are attached (``make_private``),
which imports ``torch._dynamo`` then, not at ``import privgrad``.

Privacy:
    The hooks do exactly what they do without compilation: the same captures, the same
    per-sample gradients, the same checks (tests/engine/test_compile.py compares a compiled run
    with the eager one step by step).
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["eager", "unwrapped"]


def eager(hook):
    """``hook``, run outside any ``torch.compile`` trace (a graph break at each call)."""
    return torch.compiler.disable(hook, recursive=True)


def unwrapped(hook):
    """The function ``eager()`` wrapped (or ``hook`` itself)."""
    return inspect.unwrap(hook)
