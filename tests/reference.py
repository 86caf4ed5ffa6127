"""Independent references for per-sample gradients: ``torch.func.grad`` per example, and a plain
autograd loop over examples. Both run one example at a time, so they cannot share a bug with the
batched rules.

A case is described by ``example(i) -> (args, kwargs)``, the inputs of example ``i`` alone (with
a batch dimension of 1), and ``loss(i, output) -> scalar``, example ``i``'s own loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad

Example = Callable[[int], tuple]
Loss = Callable[[int, object], torch.Tensor]


def trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def func_per_example(module: nn.Module, example: Example, loss: Loss, batch: int):
    """``torch.func.grad`` of each example's loss, parameters swapped in functionally."""
    params = {n: p.detach() for n, p in trainable(module).items()}
    rows = []
    for i in range(batch):
        args, kwargs = example(i)
        rows.append(grad(lambda p: loss(i, functional_call(module, p, args, kwargs, strict=False)))(params))
    return _stack(rows, params, batch)


def loop_per_example(module: nn.Module, example: Example, loss: Loss, batch: int):
    """Plain autograd, one example at a time."""
    params = trainable(module)
    rows = []
    for i in range(batch):
        args, kwargs = example(i)
        grads = torch.autograd.grad(loss(i, module(*args, **kwargs)), list(params.values()),
                                    allow_unused=True)
        rows.append({n: (g if g is not None else torch.zeros_like(p))
                     for (n, p), g in zip(params.items(), grads)})
    return _stack(rows, params, batch)


def _stack(rows, params, batch):
    if batch == 0:
        return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
    return {n: torch.stack([r[n] for r in rows]) for n in params}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "",
                 floor: float = 0.0):
    """Max absolute error relative to the reference's largest entry (or to ``floor`` where that
    is larger: a parameter whose true gradient is zero is compared at the model's scale) <= rtol."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp(min=max(floor, 1e-12))
    err = ((actual.to(expected.dtype) - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol}"
