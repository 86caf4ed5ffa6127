"""Checking a module's per-sample gradients, norms and weighted sums, in every engine mode,
against the one-example references (float64)."""

from __future__ import annotations

import copy

import torch
from torch.utils._pytree import tree_map

from privgrad.engine import MODES, PerSampleGradients
from tests.reference import assert_close, func_per_example, loop_per_example


def slicer(args, kwargs, batch):
    """Example ``i`` = row ``i`` of every tensor whose first dimension is the batch."""
    def example(i):
        cut = lambda x: x[i:i + 1] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x  # noqa: E731
        return tree_map(cut, args), tree_map(cut, kwargs)
    return example


def check_module(module, args, kwargs=None, *, batch=None, example=None, modes=MODES,
                 rtol=1e-5, rules=None, skip_parameter_grads=False, engine_dtype=None):
    """Assert the engine's per-sample results for ``module`` on the batch equal the references.

    The loss is ``sum(output * R)`` with a fixed random ``R``, so example ``i``'s own loss is
    ``sum(output_i * R_i)``. ``skip_parameter_grads`` runs the engine as private training does
    (autograd forms no parameter gradient where a rule gives the input gradient alone).
    ``engine_dtype=torch.float32`` runs the engine on a float32 copy of the (float64) module and
    inputs and compares it with the float64 references (row 5: error <= 1e-5 in float32).
    """
    kwargs = kwargs or {}
    with torch.no_grad():
        out = module(*args, **kwargs)
    if batch is None:
        batch = out.shape[0]
    r = torch.randn_like(out)
    example = example or slicer(args, kwargs, batch)

    def loss(i, output):
        return (output * r[i:i + 1]).sum()

    ref = func_per_example(module, example, loss, batch)
    loop = loop_per_example(module, example, loss, batch)
    for name in ref:
        assert_close(loop[name], ref[name], 1e-9, f"references disagree on {name}")
    ref_norms = torch.stack([g.reshape(batch, -1 if batch else 0).square().sum(1) for g in ref.values()]).sum(0).sqrt() \
        if ref else torch.zeros(batch, dtype=torch.float64)
    weights = torch.rand(batch, dtype=torch.float64)
    if engine_dtype is not None:  # the engine in float32; references stay float64
        module = copy.deepcopy(module).to(engine_dtype)
        cast = lambda x: x.to(engine_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
        args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        r, weights = r.to(engine_dtype), weights.to(engine_dtype)
    names = {p: n for n, p in module.named_parameters()}
    # A parameter whose true gradient is exactly zero (a query projection that attends to a
    # single key) is compared at 1e-6 of the module's largest per-sample gradient entry.
    floor = 1e-6 * max((float(g.abs().max()) for g in ref.values() if g.numel()), default=0.0)
    for mode in modes:
        with PerSampleGradients(module, mode=mode, rules=rules,
                                skip_parameter_grads=skip_parameter_grads) as psg:
            (module(*args, **kwargs) * r).sum().backward()
        module.zero_grad(set_to_none=True)
        assert_close(psg.norms, ref_norms, rtol, f"{mode}: per-sample norms")
        sums = psg.batch.weighted_sums(weights)
        assert {names[p] for p in sums} == set(ref), f"{mode}: parameters covered"
        for p, s in sums.items():
            expected = torch.einsum("b,b...->...", weights.double(), ref[names[p]])
            assert_close(s, expected, rtol, f"{mode}: weighted sum of {names[p]}", floor)
        if mode == "materialize":
            got = psg.gradients
            for name in ref:
                assert_close(got[name], ref[name], rtol, f"per-sample gradient of {name}", floor)
    return ref
