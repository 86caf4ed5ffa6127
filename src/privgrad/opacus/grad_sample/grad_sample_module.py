"""Opacus's ``GradSampleModule``: a model that leaves per-sample gradients in ``p.grad_sample``.

For Opacus code that assembles DP-SGD by hand (with ``DPOptimizer``) or inspects per-sample
gradients; ``make_private`` never uses it (privgrad's engine keeps per-sample state in its own
dictionaries). The per-sample gradients are privgrad's (``privgrad.engine.Recorder`` and
``BackwardBatch``: the same exact rules as private training), written after every backward
pass into ``p.grad_sample`` of each trainable parameter the pass reached, *added* to what is
there (Opacus accumulates too; ``forbid_accumulation_hook`` refuses a second forward instead).

As in Opacus, this wraps: ``state_dict()`` keys gain the ``_module.`` prefix, and attributes
not found on the wrapper are looked up on the wrapped model (``gsm.fc1``).
"""

from __future__ import annotations

from torch import nn

import privgrad
from privgrad import _validate
from privgrad.engine import BackwardBatch, Recorder
from privgrad.errors import ModelValidationError
from privgrad.layers import RuleRegistry

__all__ = ["GradSampleModule"]


class GradSampleModule(nn.Module):
    """Wraps ``m`` and writes each backward pass's per-sample gradients to ``p.grad_sample``.

    Args:
        m: the model.
        batch_first: must be ``True``: privgrad's rules know each layer's batch dimension, and
            a model that hands ``(T, B, ...)`` tensors to a ``Linear`` cannot be served.
        loss_reduction: ``"mean"`` (the loss averages the batch: per-sample gradients are
            multiplied by the batch size, so each row is one example's own gradient) or
            ``"sum"``.
        strict: refuse a model with ``privgrad.validate`` findings (BatchNorm, ...).
        force_functorch: accepted, unused (privgrad picks each layer's method).

    Privacy:
        Computes, never releases: ``p.grad_sample`` holds raw per-example gradients of the
        batch, as sensitive as the data. Each row is one example's gradient only if the loss
        sums or averages per-example losses over a batch-first batch.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = True, force_functorch: bool = False):
        super().__init__()
        if not isinstance(m, nn.Module):
            raise _validate.fail("GradSampleModule wraps a torch.nn.Module", "m",
                                 type(m).__name__, "Pass your model.")
        if batch_first is not True:
            raise _validate.fail(
                "privgrad serves batch-first models only", "batch_first", batch_first,
                "Give the model (B, ...) tensors (batch_first=True on recurrent and attention "
                "layers) and drop batch_first=False.")
        self.loss_reduction = _validate.choice("loss_reduction", loss_reduction, ("mean", "sum"))
        if strict:
            findings = privgrad.validate(m)
            if findings:
                raise ModelValidationError(
                    "GradSampleModule(strict=True) needs a model without findings; got:\n  - "
                    + "\n  - ".join(str(f) for f in findings)
                    + "\nModuleValidator.fix(model) repairs the findings marked fixable.",
                    findings)
        self._module = m
        self._recorder = Recorder(m, RuleRegistry.default(), self._on_backward)
        self._recorder.attach()

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_module":
                raise
            return getattr(self._module, name)

    def _on_backward(self, captures) -> None:
        batch = BackwardBatch(captures, mode="materialize",
                              scale_by_batch=self.loss_reduction == "mean",
                              paths=self._recorder.paths)
        for p in batch.parameters:
            g = batch.per_sample_gradients(p).detach()
            held = getattr(p, "grad_sample", None)
            p.grad_sample = g if held is None or held.shape != g.shape else held + g
        for c in captures:
            c.release()

    def trainable_parameters(self):
        """``(name, parameter)`` for every parameter that requires grad."""
        return ((n, p) for n, p in self._module.named_parameters() if p.requires_grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` (``nn.Module.zero_grad``) and ``p.grad_sample``."""
        self.del_grad_sample()
        super().zero_grad(set_to_none=set_to_none)

    def del_grad_sample(self) -> None:
        """Drop ``p.grad_sample`` of every parameter."""
        for p in self._module.parameters():
            p.grad_sample = None

    def remove_hooks(self) -> None:
        """Take privgrad's hooks off the wrapped model (it computes no more per-sample
        gradients)."""
        self._recorder.detach()

    def to_standard_module(self) -> nn.Module:
        """Remove the hooks and return the wrapped model."""
        self.remove_hooks()
        self.del_grad_sample()
        return self._module
