"""Opacus's ``DPOptimizer`` for hand-assembled DP-SGD, on privgrad's clipping and noise.

This is for Opacus code that builds the pieces itself (``GradSampleModule``, ``DPDataLoader``,
``DPOptimizer``, an accountant hook), as Opacus's advanced tutorial does; ``make_private`` never
uses it. The optimizer reads the per-sample gradients that ``GradSampleModule`` leaves in
``p.grad_sample``, and works in Opacus's stages, each overridable: ``clip_and_accumulate``
(clipped sum into ``p.summed_grad``), ``add_noise`` (``p.grad``), ``scale_grad`` (the
normaliser), then the wrapped optimizer's ``step``. The arithmetic is privgrad's
(``privgrad.privatize.flat_clip`` and ``noisy_gradients``).

Unlike ``make_private``, nothing here checks that the rows are a Poisson sample, that the model
writes no state, or that the per-sample gradients add up (those guards belong to the engine):
what it releases is as private as the loop that feeds it. Per-parameter attributes
(``grad_sample``, ``summed_grad``) are Opacus's interface and live on the parameters here only.
"""

from __future__ import annotations

import torch

from privgrad import _validate
from privgrad.errors import PrivacyStateError
from privgrad.opacus.optimizers.view import OptimizerView
from privgrad.privatize import flat_clip, noise_source, noisy_gradients
from privgrad.settings import privatised

__all__ = ["DPOptimizer", "_check_processed_flag", "_mark_as_processed"]


def _tensors(obj) -> list:
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def _mark_as_processed(obj) -> None:
    """Mark a tensor (or list of tensors) as consumed by a step."""
    for x in _tensors(obj):
        x._processed = True


def _check_processed_flag(obj) -> None:
    """Refuse a tensor (or list of tensors) that a step has consumed already.

    Raises:
        PrivacyStateError: a per-sample gradient or clipped sum would be released twice.
    """
    if any(getattr(x, "_processed", False) for x in _tensors(obj)):
        raise PrivacyStateError(
            "each step's per-sample gradients must be used by one optimizer step; got gradients "
            "a step has used already (no zero_grad() since). Using them again would release the "
            "same examples twice. Call optimizer.zero_grad() after every step.")


class DPOptimizer(OptimizerView):
    """Clip ``p.grad_sample``, add Gaussian noise, normalise, then step the wrapped optimizer.

    Args:
        optimizer: the optimizer to step (``original_optimizer``; all state stays there).
        noise_multiplier: sigma (an attribute: a step hook reads it, so a noise schedule may
            change it between steps).
        max_grad_norm: C, the per-sample L2 bound over all parameters.
        expected_batch_size: the normaliser of ``loss_reduction="mean"``: the *expected* batch
            size (never the realised one, which depends on the private sample).
        loss_reduction: ``"mean"`` or ``"sum"``.
        generator: a ``torch.Generator`` to seed the noise from (default: PyTorch's global
            random state).
        secure_mode: draw the noise from privgrad's secure source instead.

    Privacy:
        One ``step`` releases ``(sum_b clip_C(g_b) + N(0, (sigma C)^2 I)) / normaliser`` for the
        rows in ``p.grad_sample``, which is DP only if those rows are one Poisson sample (use
        ``DPDataLoader``) and each row is one example's gradient; account for every step
        (``attach_step_hook``). An example with a non-finite gradient is dropped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float | None,
                 loss_reduction: str = "mean", generator: torch.Generator | None = None,
                 secure_mode: bool = False, **kwargs):
        super().__init__(optimizer)
        if kwargs:
            raise _validate.fail("DPOptimizer takes Opacus's flat-clipping arguments only",
                                 "keywords", sorted(kwargs), "Drop them.")
        self.noise_multiplier = _validate.finite_nonnegative(
            "noise_multiplier", noise_multiplier, "Pass the noise std relative to "
            "max_grad_norm, e.g. 1.0.")
        self.max_grad_norm = _validate.positive("max_grad_norm", max_grad_norm,
                                                "Pass the per-sample L2 clipping bound, e.g. 1.0.")
        self.loss_reduction = _validate.choice("loss_reduction", loss_reduction, ("mean", "sum"))
        if loss_reduction == "mean" or expected_batch_size is not None:
            expected_batch_size = _validate.positive(
                "expected_batch_size", expected_batch_size,
                "Pass sample_rate * len(dataset), the batch size expected on average.")
        self.expected_batch_size = expected_batch_size
        if secure_mode and generator is not None:
            raise _validate.fail("secure mode draws its noise from the operating system",
                                 "generator", type(generator).__name__,
                                 "Pass generator=None with secure_mode=True.")
        source = noise_source(None, bool(secure_mode))
        if generator is not None:  # privgrad's source with its own generator, seeded from it
            source = source.seeded(int(torch.randint(0, 2**62, (1,), dtype=torch.int64,
                                                     generator=generator)))
        self._noise = source
        self.step_hook = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The trainable parameters, in optimizer order, without repeats."""
        return privatised(self.original_optimizer)

    @property
    def grad_samples(self) -> list[torch.Tensor]:
        """``p.grad_sample`` for every parameter in ``params``."""
        return [self._grad_sample(p) for p in self.params]

    @property
    def accumulated_iterations(self) -> int:
        """Always 1: a step consumes one backward pass's rows (no accumulation)."""
        return 1

    def attach_step_hook(self, fn) -> None:
        """Call ``fn(self)`` at every step, after the noise (e.g. an accountant's hook)."""
        self.step_hook = fn

    @staticmethod
    def _grad_sample(p) -> torch.Tensor:
        g = getattr(p, "grad_sample", None)
        if g is None:
            raise PrivacyStateError(
                f"every trainable parameter needs per-sample gradients before a step; got "
                f"p.grad_sample=None for a parameter of shape {tuple(p.shape)}. Wrap the model "
                f"in GradSampleModule and run a backward pass first.")
        return g

    def clip_and_accumulate(self) -> None:
        """Add ``sum_b min(1, C / ||g_b||) g_b`` to ``p.summed_grad`` for every parameter."""
        params = self.params
        samples = [self._grad_sample(p) for p in params]
        _check_processed_flag(samples)
        batch = samples[0].shape[0]
        norms_sq = {p: g.flatten(1).double().square().sum(1)
                    for p, g in zip(params, samples, strict=True)}
        clip = flat_clip(norms_sq, self.max_grad_norm, batch, device=samples[0].device)
        for p, g in zip(params, samples, strict=True):
            kept = g if clip.keep is None else torch.where(
                clip.keep.view(-1, *[1] * (g.dim() - 1)), g, 0)
            total = torch.einsum("b,b...->...", clip.weights.to(g.dtype), kept)
            held = getattr(p, "summed_grad", None)
            p.summed_grad = total if held is None else held + total
        _mark_as_processed(samples)

    def add_noise(self) -> None:
        """``p.grad = p.summed_grad + N(0, (sigma C)^2)``, one draw per parameter."""
        params = self.params
        sums = {p: p.summed_grad for p in params}
        _check_processed_flag(list(sums.values()))
        grads = noisy_gradients(params, sums, noise_std=self.noise_multiplier * self.max_grad_norm,
                                normaliser=1.0, noise=self._noise)
        for p in params:
            p.grad = grads[p].view_as(p)
        _mark_as_processed(list(sums.values()))

    def scale_grad(self) -> None:
        """Divide ``p.grad`` by the expected batch size (``loss_reduction="mean"``)."""
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size * self.accumulated_iterations

    def pre_step(self, closure=None) -> bool:
        """Clip, noise and scale, then run the step hook; ``True``: the step may go ahead."""
        self.clip_and_accumulate()
        self.add_noise()
        self.scale_grad()
        if self.step_hook is not None:
            self.step_hook(self)
        return True

    def step(self, closure=None):
        """Run ``closure`` (if any) with gradients on, privatise, step the wrapped optimizer."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            return self.original_optimizer.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``grad_sample`` and ``summed_grad`` of every parameter, then ``p.grad``."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad_sample = None
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def __setattr__(self, name: str, value) -> None:
        if name == "noise_multiplier":  # a schedule may change it; keep it checked
            value = _validate.finite_nonnegative("noise_multiplier", value,
                                                 "Pass the noise std relative to max_grad_norm.")
        object.__setattr__(self, name, value)
