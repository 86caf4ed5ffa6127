"""Check a layer rule the way privgrad checks its own:
[`check_rule()`][privgrad.testing.check_rule].

A rule is exact when row ``b`` of what it returns is the gradient of example ``b``'s own loss and
depends on no other example. [`check_rule()`][privgrad.testing.check_rule] runs the module on a
batch under the engine, in every engine mode, and compares the per-sample gradients, the per-sample
norms (the ghost norms where the rule has them) and the weighted sums with two references computed
one example at a time in float64, which cannot share a bug with a batched rule:

- ``func_per_example()``: ``torch.func.grad`` of each example's own loss, the parameters
  swapped in functionally;
- ``loop_per_example()``: plain autograd, one example at a time.

The two references must agree with each other first. Then the batch, and its first example alone
and no example at all (batch sizes 1 and 0), are checked; a mismatch raises ``AssertionError``
naming the mode, the quantity, the parameter and the error.

>>> from privgrad.testing import check_rule
>>> check_rule(LayerScale(6), (torch.randn(5, 3, 6),), rule=LayerScaleRule())  # doctest: +SKIP

A case is described by ``example(i) -> (args, kwargs)``, the inputs of example ``i`` alone (with
a batch dimension of 1), and ``loss(i, output) -> scalar``, example ``i``'s own loss. This module
needs neither pytest nor hypothesis.

Privacy:
    Passing is evidence, not proof: it shows exactness on the shapes and values tried. Try the
    configurations your model uses (sequence lengths, padding, masks, batch sizes 0 and 1).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call, grad
from torch.utils._pytree import tree_leaves, tree_map

from privgrad.engine import MODES, PerSampleGradients
from privgrad.layers import LayerRule, RuleRegistry

__all__ = ["assert_close", "check_rule", "func_per_example", "loop_per_example"]

Example = Callable[[int], tuple]
Loss = Callable[[int, object], torch.Tensor]


def _trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def func_per_example(module: nn.Module, example: Example, loss: Loss,
                     batch: int) -> dict[str, torch.Tensor]:
    """``torch.func.grad`` of each example's loss, parameters swapped in functionally:
    ``{name: (batch, *shape)}`` for every trainable parameter."""
    params = {n: p.detach() for n, p in _trainable(module).items()}
    rows = []
    for i in range(batch):
        args, kwargs = example(i)
        rows.append(grad(lambda p: loss(i, functional_call(module, p, args, kwargs,
                                                           strict=False)))(params))
    return _stack(rows, params, batch)


def loop_per_example(module: nn.Module, example: Example, loss: Loss,
                     batch: int) -> dict[str, torch.Tensor]:
    """Plain autograd, one example at a time: ``{name: (batch, *shape)}``."""
    params = _trainable(module)
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
                 floor: float = 0.0) -> None:
    """Max absolute error relative to the reference's largest entry (or to ``floor`` where that
    is larger: a parameter whose true gradient is zero is compared at the model's scale) <= rtol."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp(min=max(floor, 1e-12))
    err = ((actual.to(expected.dtype) - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol}"


def _slicer(args: tuple, kwargs: dict, batch: int) -> Example:
    """Example ``i`` = row ``i`` of every tensor whose first dimension is the batch."""
    def example(i):
        return _rows(args, batch, slice(i, i + 1)), _rows(kwargs, batch, slice(i, i + 1))
    return example


def _rows(tree, batch: int, rows: slice):
    """``tree`` with every tensor whose first dimension is the batch cut to ``rows``."""
    def cut(x):
        return x[rows] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x
    return tree_map(cut, tree)


def _float64(tree):
    """``tree`` with its floating tensors in float64 (``tree`` itself where they are)."""
    leaves = tree_leaves(tree)
    if all(x.dtype == torch.float64 for x in leaves
           if isinstance(x, torch.Tensor) and x.is_floating_point()):
        return tree
    return tree_map(lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                    else x, tree)


def check_rule(module: nn.Module, inputs: tuple, kwargs: dict | None = None, *,
               rule: LayerRule | None = None, rules: RuleRegistry | None = None,
               batch: int | None = None, example: Example | None = None,
               batch_sizes: Iterable[int] = (0, 1), modes: Iterable[str] = MODES,
               rtol: float = 1e-5, skip_parameter_grads: bool = False,
               engine_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Assert that the engine's per-sample results for ``module`` equal the references.

    The loss is ``sum(output * R)`` with a random ``R`` (from torch's global generator), so
    example ``i``'s own loss is ``sum(output_i * R_i)``: ``module`` must return one tensor with
    the batch in dimension 0. The module and the floating inputs are taken in float64 (a copy
    where they are not).

    Args:
        module: the layer (or a model of layers) to check.
        inputs: the positional inputs of one batched call.
        kwargs: its keyword inputs.
        rule: the rule to check for ``type(module)``; default: what ``rules`` gives.
        rules: the registry the engine uses (default: ``RuleRegistry.default()``).
        batch: the number of examples (default: the output's first dimension).
        example: ``i -> (args, kwargs)``, the inputs of example ``i`` alone (default: row ``i``
            of every tensor whose first dimension is the batch).
        batch_sizes: also check the first ``k`` examples alone for each ``k`` below the batch
            (default 0 and 1), with the default ``example`` only.
        modes: the engine modes to run (``"auto"``, ``"ghost"``, ``"materialize"``).
        rtol: the largest error allowed, relative to the reference's largest entry.
        skip_parameter_grads: run the engine as private training does (where a rule gives the
            input gradient alone, autograd forms no parameter gradient).
        engine_dtype: run the engine on a copy of the module and inputs in this dtype (e.g.
            ``torch.float32``); the references stay float64.

    Returns:
        The per-sample gradients of the whole batch, ``{name: (batch, *shape)}`` (float64).

    Raises:
        AssertionError: the references disagree, or the rule's per-sample gradients, norms or
            weighted sums differ from them by more than ``rtol`` (the message names the mode,
            the quantity and the parameter).
    """
    kwargs = kwargs or {}
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if any(t.dtype != torch.float64 for t in tensors):
        module = copy.deepcopy(module).double()
    inputs, kwargs = _float64(tuple(inputs)), _float64(kwargs)
    if example is not None:
        given = example
        example = lambda i: _float64(given(i))  # noqa: E731
    registry = rules if rules is not None else RuleRegistry.default()
    if rule is not None:
        registry = registry.with_rule(type(module), rule)
    check = {"registry": registry, "modes": tuple(modes), "rtol": rtol,
             "engine_dtype": engine_dtype, "skip_parameter_grads": skip_parameter_grads}
    ref, batch = _check_batch(module, inputs, kwargs, batch, example, **check)
    for k in batch_sizes if example is None else ():
        if k < batch:
            rows = slice(0, k)
            _check_batch(module, _rows(inputs, batch, rows), _rows(kwargs, batch, rows), k,
                         None, **check)
    return ref


def _check_batch(module, args, kwargs, batch, example, *, registry, modes, rtol, engine_dtype,
                 skip_parameter_grads):
    """[`check_rule()`][privgrad.testing.check_rule] on one batch: ``(references, batch size)``."""
    with torch.no_grad():
        out = module(*args, **kwargs)
    if batch is None:
        batch = out.shape[0]
    r = torch.randn_like(out)
    example = example or _slicer(args, kwargs, batch)
    where = f"check_rule({type(module).__name__}), batch {batch}"

    def loss(i, output):
        return (output * r[i:i + 1]).sum()

    ref = func_per_example(module, example, loss, batch)
    loop = loop_per_example(module, example, loss, batch)
    for name in ref:
        assert_close(loop[name], ref[name], 1e-9, f"{where}: references disagree on {name}")
    per_param = {n: g.reshape(batch, -1 if batch else 0).square().sum(1) for n, g in ref.items()}
    ref_norms = torch.stack(list(per_param.values())).sum(0).sqrt() if ref \
        else torch.zeros(batch, dtype=torch.float64)
    scale = float(ref_norms.max()) if batch else 0.0
    weights = torch.rand(batch, dtype=torch.float64)
    if engine_dtype is not None:  # the engine in that dtype; references stay float64
        module = copy.deepcopy(module).to(engine_dtype)
        cast = lambda x: x.to(engine_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
        args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        r, weights = r.to(engine_dtype), weights.to(engine_dtype)
    names = {p: n for n, p in module.named_parameters()}
    # A parameter whose true gradient is exactly zero (a query projection that attends to a
    # single key) is compared at 1e-6 of the module's largest per-sample gradient entry.
    floor = 1e-6 * max((float(g.abs().max()) for g in ref.values() if g.numel()), default=0.0)
    for mode in modes:
        with PerSampleGradients(module, mode=mode, rules=registry,
                                skip_parameter_grads=skip_parameter_grads) as psg:
            (module(*args, **kwargs) * r).sum().backward()
        module.zero_grad(set_to_none=True)
        at = f"{where}, mode {mode!r}"
        norms_sq = {names[p]: sq for p, sq in psg.batch.norms_sq.items()}
        _same_names(norms_sq, ref, f"{at}: parameters normed")
        for name, sq in norms_sq.items():  # at the module's scale; d(n^2) = 2 n dn
            assert_close(sq, per_param[name], 2 * rtol, f"{at}: per-sample squared norm of {name}",
                         scale**2)
        assert_close(psg.norms, ref_norms, rtol, f"{at}: per-sample norms")
        sums = psg.batch.weighted_sums(weights)
        _same_names({names[p] for p in sums}, ref, f"{at}: parameters covered")
        for p, s in sums.items():
            expected = torch.einsum("b,b...->...", weights.double(), ref[names[p]])
            assert_close(s, expected, rtol, f"{at}: weighted sum of {names[p]}", floor)
        if mode == "materialize":
            got = psg.gradients
            for name in ref:
                assert_close(got[name], ref[name], rtol, f"{at}: per-sample gradient of {name}",
                             floor)
    return ref, batch


def _same_names(got, ref: dict, what: str) -> None:
    got = set(got)
    assert got == set(ref), (f"{what}: missing {sorted(set(ref) - got)}, unexpected "
                             f"{sorted(got - set(ref))}")
