"""The functional entry point: per-sample gradients and norms for a batch, for people who write
their own loop (research code, custom mechanisms).

>>> with PerSampleGradients(model, loss_reduction="sum") as psg:        # doctest: +SKIP
...     criterion(model(x), y).backward()
>>> psg.gradients["fc.weight"].shape      # (batch, *fc.weight.shape)  # doctest: +SKIP
>>> psg.norms                             # (batch,) over all parameters # doctest: +SKIP

Then [`private_step()`][privgrad.engine.functional.private_step] clips, sums, adds noise and writes
``p.grad``:

>>> private_step(psg.batch, list(model.parameters()), noise_multiplier=1.0,
...              max_grad_norm=1.0)                                      # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from privgrad import _validate
from privgrad.engine.batch import MODES, BackwardBatch, materialize_early
from privgrad.engine.capture import Recorder
from privgrad.engine.clipped_sum import ClippedSum, StepStats
from privgrad.layers import RuleRegistry
from privgrad.privatize import CLIPPING, TorchGaussian, check_source, noisy_gradients
from privgrad.privatize.adaptive import check_options
from privgrad.privatize.clipping import per_layer_bounds


class PerSampleGradients:
    """Context manager that records per-sample gradient information of the backward passes run
    inside it. Hooks come off when the block exits.

    Args:
        module: the model.
        loss_reduction: ``"sum"`` (the default here) if the loss adds the examples' losses,
            ``"mean"`` if it averages them (then captured gradients are multiplied by the batch
            size, so each row is the gradient of that example's own loss). Opacus's
            ``GradSampleModule`` defaults to ``"mean"``: code ported from it with a mean loss
            must pass ``loss_reduction="mean"``, or its rows come out ``1/B`` of each example's
            gradient.
        mode: ``"materialize"`` (default here: [`gradients`][privgrad.PerSampleGradients.gradients]
            is available), ``"auto"`` or ``"ghost"`` (norms and weighted sums only, without
            per-sample tensors where possible).
        rules: rule registry (default: built-in rules plus the generic rule).
        skip_parameter_grads: performance only: autograd forms no ordinary gradient for the
            parameters of layers whose rule gives the input gradient alone (``p.grad`` stays as
            it was); what [`PrivacyEngine`][privgrad.PrivacyEngine] does, since it overwrites
            ``p.grad``.
    """

    def __init__(self, module: nn.Module, *, loss_reduction: str = "sum",
                 mode: str = "materialize", rules: RuleRegistry | None = None,
                 skip_parameter_grads: bool = False):
        _validate.choice("loss_reduction", loss_reduction, ("mean", "sum"))
        _validate.choice("mode", mode, MODES)
        self.module = module
        self.mode = mode
        self.loss_reduction = loss_reduction
        self.batches: list[BackwardBatch] = []
        self._recorder = Recorder(module, rules or RuleRegistry.default(), self._on_backward,
                                  skip_parameter_grads=skip_parameter_grads,
                                  early=lambda c: materialize_early(c, self.mode))

    def _on_backward(self, captures) -> None:
        self.batches.append(BackwardBatch(
            captures, mode=self.mode, scale_by_batch=self.loss_reduction == "mean",
            paths=self._recorder.paths))

    def __enter__(self) -> PerSampleGradients:
        self._recorder.attach()
        return self

    def __exit__(self, *exc) -> None:
        self._recorder.detach()

    @property
    def batch(self) -> BackwardBatch:
        """The (single) backward pass recorded; an error if there was none or several."""
        if len(self.batches) != 1:
            from privgrad.errors import PrivacyStateError

            raise PrivacyStateError(
                f"expected exactly one backward pass inside the block; got {len(self.batches)}. "
                f"Run loss.backward() once per PerSampleGradients block, or read .batches.")
        return self.batches[0]

    @property
    def gradients(self) -> dict[str, torch.Tensor]:
        """``{parameter name: (batch, *shape)}`` (mode ``"materialize"``)."""
        names = {p: n for n, p in self.module.named_parameters()}
        return {names[p]: self.batch.per_sample_gradients(p) for p in self.batch.parameters}

    @property
    def norms(self) -> torch.Tensor:
        """``(batch,)`` per-sample gradient norms over all recorded parameters."""
        sq = list(self.batch.norms_sq.values())
        return torch.stack(sq).sum(0).sqrt() if sq else torch.zeros(self.batch.batch_size)


def per_sample_gradients(module: nn.Module, loss_fn, *, loss_reduction: str = "sum",
                         rules: RuleRegistry | None = None) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: (batch, *shape)}`` of ``loss_fn()``, which must run the
    forward pass of ``module`` and return the loss (e.g. ``lambda: F.cross_entropy(model(x), y,
    reduction="sum")``)."""
    with PerSampleGradients(module, loss_reduction=loss_reduction, rules=rules) as psg:
        loss_fn().backward()
    return psg.gradients


def private_step(batch: BackwardBatch | list[BackwardBatch], params: list[nn.Parameter], *,
                 noise_multiplier: float, max_grad_norm: float, clipping: str = "flat",
                 normaliser: float = 1.0, noise=None, gamma: float | None = None) -> StepStats:
    """Clip the recorded examples, add them up, add ``N(0, (sigma C)^2)`` once, divide by
    ``normaliser`` and write the result to ``p.grad`` for every parameter in ``params``.
    ``clipping``: ``"flat"``, ``"per_layer"`` or ``"automatic"`` (with ``gamma``, default
    0.01); adaptive clipping keeps state across steps: use the engine.

    Privacy:
        One call is one release of the subsampled Gaussian mechanism with the given
        ``noise_multiplier``; the caller must account for it (e.g. ``RDPAccountant.step``) and
        must pass a ``normaliser`` that does not depend on the private data (the expected batch
        size, not the realised one).
    """
    sigma = _validate.finite_nonnegative(
        "noise_multiplier", noise_multiplier, "Pass the noise standard deviation relative to "
        "max_grad_norm, e.g. 1.0.")
    c = _validate.positive("max_grad_norm", max_grad_norm, "Pass the per-sample L2 clipping "
                           "bound, e.g. 1.0.")
    _validate.choice("clipping", clipping, [m for m in CLIPPING if "adaptive" not in m])
    gamma = check_options(clipping=clipping, noise_multiplier=sigma, gamma=gamma,
                          target_quantile=None, quantile_lr=None, count_noise_std=None).get("gamma")
    noise = check_source(noise) if noise is not None else TorchGaussian()
    bounds = per_layer_bounds(params, c) if clipping == "per_layer" else c
    clipped = ClippedSum(bounds, sparse_sums=noise.fuses_sums, gamma=gamma)
    with torch.no_grad():  # as in optimizer.step(): the release is not part of any graph
        for b in batch if isinstance(batch, list) else [batch]:
            clipped.add(b, set(params))
        grads = noisy_gradients(params, clipped.sums, noise_std=sigma * c, normaliser=normaliser,
                                noise=noise)
    for p in params:
        p.grad = grads[p]
    return clipped.stats
