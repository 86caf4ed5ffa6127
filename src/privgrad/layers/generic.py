"""The generic rule: exact per-sample gradients of any module through ``torch.func``.

For a module with no dedicated rule, re-run its forward once per example under ``vmap`` (each
example keeps a batch dimension of 1) and pull the captured output gradient back with ``vjp``,
differentiating only the module's own parameters. This is exact for any per-example computation;
it costs one extra forward and backward of that module and materialises per-sample gradients.

What it assumes, and refuses when it can tell:
- the module treats examples independently along dimension 0 of its tensor inputs (inputs whose
  first dimension is not the batch size are passed whole to every example);
- its forward is deterministic (``vmap`` runs with ``randomness="error"``, so dropout inside
  the module is reported instead of silently using another mask).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from privgrad.errors import UnsupportedModuleError
from privgrad.layers.base import Capture, LayerRule


def first_tensor(tree) -> torch.Tensor | None:
    leaves, _ = tree_flatten(tree)
    return next((x for x in leaves if isinstance(x, torch.Tensor)), None)


class GenericRule(LayerRule):
    """Per-sample gradients of any module's direct parameters via ``torch.func``."""

    def batch_size(self, module, args, kwargs) -> int:
        x = first_tensor((args, kwargs))
        if x is None or x.dim() == 0:
            raise UnsupportedModuleError(
                f"the generic rule needs a tensor input with a batch dimension; "
                f"{type(module).__name__} got none. Write a rule for it (see "
                f"docs/custom_layers.md) or freeze its parameters.")
        return int(x.shape[0])

    def per_sample_gradients(self, module: nn.Module, capture: Capture, names):
        b = capture.batch_size
        params = {n: getattr(module, n).detach() for n in names}

        def in_dim(x):
            return 0 if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == b else None

        def add_batch_dim(x):
            return x.unsqueeze(0) if isinstance(x, torch.Tensor) else x

        def one_example(p, args, kwargs, grad_outputs):
            args, kwargs = tree_map(add_batch_dim, args), tree_map(add_batch_dim, kwargs)

            def forward(p):
                leaves, _ = tree_flatten(functional_call(module, p, args, kwargs, strict=False))
                return tuple(leaves[i] for i in capture.output_index)

            _, pullback = vjp(forward, p)
            return pullback(tuple(g.unsqueeze(0) for g in grad_outputs))[0]

        in_dims = (None, tree_map(in_dim, capture.args), tree_map(in_dim, capture.kwargs), 0)
        try:
            return vmap(one_example, in_dims=in_dims, randomness="error")(
                params, capture.args, capture.kwargs, tuple(capture.grad_outputs))
        except Exception as e:  # torch raises RuntimeError/ValueError with varied texts
            raise UnsupportedModuleError(
                f"the generic torch.func rule could not compute per-sample gradients for "
                f"{type(module).__name__}: {e}. Fixes: write a rule for it (one small file, see "
                f"docs/custom_layers.md), freeze its parameters (requires_grad_(False)), or "
                f"move its randomness (dropout) into a separate module.") from e
