"""What every architecture test checks, on top of ``tests/layers/cases.py``:

- :func:`check_per_sample`: the engine's per-sample norms, weighted sums and (materialised)
  gradients, in every engine mode, against one-example references in float64: plain autograd one
  example at a time, and ``torch.func.grad`` where the model allows it (the two must agree);
- :func:`check_private_step`: a private step with ``sigma = 0`` and a bound that binds for every
  example writes exactly ``sum_b min(1, C / ||g_b||) g_b`` into ``p.grad``: the engine's first
  step (self-checked, on autograd's own backward) and the next one (on the fast paths).

A case is a model, its batched inputs, ``example(i) -> (args, kwargs)`` (example ``i`` alone)
and ``loss(rows, output) -> scalar`` for the examples ``rows`` (a slice), so that the batch's
loss is the sum of the examples' own losses.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.engine import MODES, PerSampleGradients
from tests.helpers import drawn
from tests.reference import func_per_example, loop_per_example


def references(model, example, loss, batch: int, *, func: bool = True) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{name: (batch, *shape)}``; with ``func``, both references agree."""
    def own(i, output):
        return loss(slice(i, i + 1), output)

    ref = loop_per_example(model, example, own, batch)
    if func:
        other = func_per_example(model, example, own, batch)
        assert set(other) == set(ref)
        for name in ref:
            close(other[name], ref[name], 1e-9, floor_of(ref), f"references disagree on {name}")
    return ref


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, floor: float, what: str):
    """Max error relative to the reference's largest entry, or to ``floor`` where that is
    smaller: a gradient that is zero in exact arithmetic (a key bias under softmax) is rounding
    noise in both, and is compared against the model's gradient scale instead."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(float(expected.abs().max()), floor, 1e-300)
    err = float((actual.detach().to(expected.dtype) - expected).abs().max()) / scale
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol}"


def floor_of(ref: dict[str, torch.Tensor]) -> float:
    """1e-6 of the largest per-sample gradient entry of the model."""
    return 1e-6 * max((float(g.abs().max()) for g in ref.values() if g.numel()), default=0.0)


def norms_of(ref: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    return torch.stack([g.reshape(batch, -1).square().sum(1) for g in ref.values()]).sum(0).sqrt()


def check_per_sample(model, args, kwargs, example, loss, batch: int, *, func: bool = True,
                     modes=MODES, rtol: float = 1e-6) -> dict[str, torch.Tensor]:
    """Assert the engine's per-sample results equal the references in every mode; return them."""
    ref = references(model, example, loss, batch, func=func)
    floor = floor_of(ref)
    weights = torch.rand(batch, dtype=torch.float64)
    names = {p: n for n, p in model.named_parameters()}
    for mode in modes:
        with PerSampleGradients(model, mode=mode) as psg:
            loss(slice(None), model(*args, **kwargs)).backward()
        model.zero_grad(set_to_none=True)
        close(psg.norms, norms_of(ref, batch), rtol, 0.0, f"{mode}: per-sample norms")
        sums = psg.batch.weighted_sums(weights)
        assert {names[p] for p in sums} == set(ref), f"{mode}: parameters covered"
        for p, s in sums.items():
            expected = torch.einsum("b,b...->...", weights, ref[names[p]])
            close(s, expected, rtol, floor, f"{mode}: weighted sum of {names[p]}")
        if mode == "materialize":
            for name, g in psg.gradients.items():
                close(g, ref[name], rtol, floor, f"per-sample gradient of {name}")
    return ref


def check_private_step(model, args, kwargs, example, loss, batch: int, *, mode: str = "auto",
                       ref: dict[str, torch.Tensor] | None = None, rtol: float = 1e-8) -> None:
    """A private step (sigma = 0, C = half the smallest per-example norm) equals the reference
    clipped sum, twice (lr = 0): the first step is self-checked by the engine (autograd's own
    backward), the second takes the fast paths. The model is attached with ``make_private`` and
    detached afterwards."""
    ref = ref if ref is not None else references(model, example, loss, batch, func=False)
    norms, floor = norms_of(ref, batch), floor_of(ref)
    c = 0.5 * float(norms.min())
    factors = c / norms
    assert (factors < 1).all()  # the bound binds for every example
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    engine.make_private(module=model, optimizer=optimizer,
                        data_loader=DataLoader(TensorDataset(torch.zeros(16)), batch_size=4),
                        noise_multiplier=0.0, max_grad_norm=c, loss_reduction="sum",
                        grad_sample_mode=mode)
    try:
        for step in ("first step", "second step"):
            optimizer.zero_grad()
            drawn(engine, batch)
            loss(slice(None), model(*args, **kwargs)).backward()
            optimizer.step()
            for name, p in model.named_parameters():
                if p.requires_grad:
                    expected = torch.einsum("b,b...->...", factors.to(ref[name].dtype), ref[name])
                    close(p.grad, expected, rtol, floor, f"{mode}, {step}: clipped sum of {name}")
    finally:
        engine.detach()
        optimizer.zero_grad()
