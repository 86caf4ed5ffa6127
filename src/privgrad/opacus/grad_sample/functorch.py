"""``opacus.grad_sample.functorch.make_functional``: a model as a function of its parameters.

Written on ``torch.func.functional_call``. It is what Opacus code imports for its
``grad_sample_mode="no_op"`` loops (per-sample gradients computed by the user with
``torch.func.vmap``); privgrad.opacus refuses that mode (privgrad computes the per-sample
gradients itself), but the function works on its own.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_functional"]


def make_functional(mod: nn.Module, disable_autograd_tracking: bool = False):
    """``(fmodel, params)``: ``fmodel(params, *args, **kwargs)`` runs ``mod`` with ``params``
    (a sequence in ``mod.named_parameters()`` order) in place of its own parameters.

    Args:
        mod: the model. It is called as it is, hooks included: do not pass a model under a
            privacy engine (its hooks would record the functional calls).
        disable_autograd_tracking: return ``params`` detached.
    """
    names = [name for name, _ in mod.named_parameters()]
    params = tuple(p.detach() if disable_autograd_tracking else p
                   for _, p in mod.named_parameters())

    def fmodel(new_params, *args, **kwargs):
        values = dict(zip(names, new_params, strict=True))
        return torch.func.functional_call(mod, values, args, kwargs)

    return fmodel, params
