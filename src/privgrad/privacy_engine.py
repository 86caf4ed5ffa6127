"""``PrivacyEngine``: one call makes a training loop differentially private.

This is the one stateful place that wires the rooms together: sampling (Poisson batches), the
engine (per-sample norms and sums), privatize (clipping, noise, the gradient written to
``p.grad``) and accounting. The model and the optimizer stay the user's own objects: privgrad
adds forward hooks to the model, tensor hooks to its outputs and a step pre-hook to the optimizer,
and :meth:`PrivacyEngine.detach` removes them all.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from privgrad import _validate
from privgrad import checkpoint as _checkpoint
from privgrad.accounting import get_noise_multiplier, make_accountant
from privgrad.distributed import DataParallel, data_parallel, privacy_fingerprint
from privgrad.engine.amp import ScalerLink, check_grad_scaler, float32_captures
from privgrad.engine.batch import MODES, BackwardBatch, materialize_early
from privgrad.engine.capture import Recorder
from privgrad.errors import ConfigError, ModelValidationError, PrivacyStateError
from privgrad.layers import RuleRegistry
from privgrad.privatize import CLIPPING, ClippedSum, StepStats, TorchGaussian, noisy_gradients
from privgrad.sampling import PoissonSampler, numpy_bits, os_bits, steps_per_epoch
from privgrad.sampling.loader import check_loader, poisson_loader
from privgrad.sampling.virtual import VirtualBatches
from privgrad.validation import validate

# Opacus's grad_sample_mode names, accepted so that switching is a change of import.
_MODE_ALIASES = {"hooks": "materialize", "functorch": "materialize", "ew": "materialize",
                 "ghost": "auto"}

# Modules whose running statistics learn from every batch they see in training mode.
_RUNNING_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_log = logging.getLogger("privgrad")

# Modules and optimizers under a privacy engine (weak: a dropped model leaves no trace).
_ATTACHED: weakref.WeakSet = weakref.WeakSet()


class PrivacyWarning(UserWarning):
    """A setting is allowed but weakens or misdescribes the privacy guarantee."""


@dataclass(frozen=True)
class PrivacySettings:
    """What determines the guarantee. Changing any of these changes epsilon."""

    noise_multiplier: float
    max_grad_norm: float | tuple
    clipping: str
    sample_rate: float
    expected_batch_size: float
    loss_reduction: str
    poisson_sampling: bool

    @property
    def total_bound(self) -> float:
        """``C``: the flat bound, or the root-sum-of-squares of per-layer bounds."""
        if isinstance(self.max_grad_norm, tuple):
            return math.sqrt(sum(c * c for c in self.max_grad_norm))
        return float(self.max_grad_norm)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.total_bound

    @property
    def normaliser(self) -> float:
        return self.expected_batch_size if self.loss_reduction == "mean" else 1.0


@dataclass(frozen=True)
class PerformanceSettings:
    """What determines speed and memory only. Changing these never changes epsilon or the
    distribution of the update."""

    grad_sample_mode: str = "auto"


class PrivacyEngine:
    """Makes a model, optimizer and data loader train with DP-SGD, and tracks the budget.

    Args:
        accountant: ``"pld"`` (default, tight) or ``"rdp"``.
        secure_mode: draw sampling and noise from a CSPRNG seeded by the operating system,
            with noise that resists floating-point attacks (docs/reliability.md; needs
            ``pip install 'privgrad[secure]'``). Off by default, so that runs are reproducible
            after ``torch.manual_seed``.

    Privacy:
        The guarantee is (epsilon, delta)-DP under add/remove-one-example adjacency, for the
        released sequence of noisy gradients, assuming Poisson sampling (the default loader),
        that each example's loss depends on that example only (no batch statistics) and that
        the data set's size is public unless ``sample_rate`` and ``expected_batch_size`` are
        passed explicitly.
    """

    def __init__(self, accountant: str = "pld", secure_mode: bool = False):
        self.accountant = make_accountant(accountant)
        self.secure_mode = bool(secure_mode)
        self.noise = self._noise_source()
        self.settings: PrivacySettings | None = None
        self.performance: PerformanceSettings | None = None
        self.steps = 0
        self.last_step_stats: StepStats | None = None
        self.dropped_examples = 0  # non-finite examples dropped so far (monitoring, not private)
        self.layer_rules: dict[str, str] = {}  # module path -> rule serving it (a report)
        self._dataset_size: int | None = None
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._recorder: Recorder | None = None
        self._clipped: ClippedSum | None = None
        self._handles: list = []
        self._release_now = True  # False while a virtual batch's earlier chunks run
        self._backward_since_step = False  # at most one backward pass per optimizer step
        self._distributed: DataParallel | None = None  # data-parallel training only
        self._amp: ScalerLink | None = None  # a GradScaler's loss scale (mixed precision)
        self._sampler: PoissonSampler | None = None  # the loader's sampler (for checkpoints)
        self._sampler_seed: int | None = None  # None in secure mode (OS randomness)

    def _noise_source(self):
        if not self.secure_mode:
            return TorchGaussian()
        from privgrad.privatize.secure import SecureGaussian  # the reliability issue adds it

        return SecureGaussian()

    # -- making private --------------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        clipping: str = "flat",
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        sample_rate: float | None = None,
        expected_batch_size: float | None = None,
        grad_sample_mode: str = "auto",
        rules: RuleRegistry | None = None,
        distributed: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Attach DP-SGD to the user's model and optimizer; return them and a Poisson loader.

        Args:
            module: the model; returned as the same object, only hooks are added.
            optimizer: any ``torch.optim.Optimizer`` over the model's parameters; returned as the
                same object.
            data_loader: a map-style ``DataLoader`` with ``batch_size``; the returned loader
                samples each example with probability ``q = batch_size / len(dataset)``.
            noise_multiplier: sigma; noise std is ``sigma * max_grad_norm`` per step.
            max_grad_norm: C, the per-example L2 bound (per-layer clipping: a float split
                equally, or one bound per trainable parameter in optimizer order).
            clipping: ``"flat"`` or ``"per_layer"``.
            loss_reduction: ``"mean"`` (the loss averages the batch; the private gradient is
                divided by the expected batch size) or ``"sum"``.
            poisson_sampling: replace the loader's sampling with Poisson sampling (what the
                accounting assumes). ``False`` keeps the loader and warns.
            sample_rate: q, declared instead of derived from ``len(dataset)``. Pass it with
                ``expected_batch_size`` to treat the data set's size as private: then q, the
                normaliser and the steps per epoch do not depend on it.
            expected_batch_size: ``q N``, the normaliser of ``loss_reduction="mean"``; pass it
                with ``sample_rate``.
            grad_sample_mode: performance only: ``"auto"`` (cheapest exact method per layer),
                ``"ghost"`` or ``"materialize"`` (Opacus's names are accepted as aliases).
            rules: a :class:`~privgrad.layers.RuleRegistry` with custom layer rules.
            distributed: data-parallel training on ``torch.distributed`` (docs/distributed.md):
                ``None`` (default) joins the default process group when one is initialised,
                ``True`` requires one, ``False`` trains this process alone. The module may be
                wrapped in ``DistributedDataParallel``. Performance only: the world size changes
                neither epsilon nor the distribution of the update.
            grad_scaler: the ``torch.amp.GradScaler`` that scales the loss (fp16 mixed
                precision): the engine divides its scale out of the per-sample gradients before
                clipping and keeps private data out of its skip decision (docs/reliability.md).

        Returns:
            ``(module, optimizer, data_loader)``, always three values.

        Privacy:
            See the class docstring. Nothing is attached if any argument is refused.
        """
        if self._module is not None:
            raise PrivacyStateError(
                "make_private was already called on this PrivacyEngine; got a second call. Use "
                "one PrivacyEngine per training run (engine.detach() first to start over).")
        # 1. every argument, before anything changes
        sigma = _validate.finite_nonnegative(
            "noise_multiplier", noise_multiplier,
            "Pass the noise std relative to max_grad_norm, e.g. 1.0, or use "
            "make_private_with_epsilon.")
        clipping = _validate.choice("clipping", clipping, CLIPPING)
        loss_reduction = _validate.choice("loss_reduction", loss_reduction, ("mean", "sum"))
        mode = _MODE_ALIASES.get(grad_sample_mode, grad_sample_mode)
        _validate.choice("grad_sample_mode", mode, MODES)
        registry = rules if rules is not None else RuleRegistry.default()
        if not isinstance(module, nn.Module):
            raise _validate.fail("module must be a torch.nn.Module", "module",
                                 type(module).__name__, "Pass your model.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise _validate.fail("optimizer must be a torch.optim.Optimizer", "optimizer",
                                 type(optimizer).__name__, "Pass your optimizer.")
        params = _privatised(optimizer)
        bound = _check_bound(max_grad_norm, clipping, len(params))
        grad_scaler = check_grad_scaler(grad_scaler)
        ranks = data_parallel(distributed, module, poisson_sampling)
        check_loader(data_loader, poisson_sampling)
        n = _dataset_size(data_loader, poisson_sampling, sample_rate, expected_batch_size)
        q, expected = _sampling_rate(data_loader, n, sample_rate, expected_batch_size,
                                     loss_reduction, poisson_sampling)
        _check_ownership(module, optimizer)
        for obj, name in ((module, "module"), (optimizer, "optimizer")):
            if obj in _ATTACHED:
                raise PrivacyStateError(
                    f"make_private was already called on this {name}; got the same "
                    f"{type(obj).__name__} object again. Call engine.detach() on the first "
                    f"engine before attaching a new one.")
        findings = validate(module, rules=registry)
        if findings:
            listed = "\n  - ".join(str(f) for f in findings)
            raise ModelValidationError(
                f"the model is not ready for private training ({len(findings)} finding(s)):\n"
                f"  - {listed}\nprivgrad.fix(model) repairs the findings marked fixable.", findings)
        if not poisson_sampling:
            warnings.warn(
                "poisson_sampling=False: the loader keeps its own sampling, but the privacy "
                "accounting assumes Poisson sampling, so the reported epsilon does not describe "
                "this training run.", PrivacyWarning, stacklevel=2)

        settings = PrivacySettings(sigma, bound, clipping, q, expected, loss_reduction,
                                   poisson_sampling)
        if ranks is not None:  # the same configuration on every rank, or an error on every rank
            ranks.agree(privacy_fingerprint(
                settings, accountant=self.accountant.name, secure_mode=self.secure_mode,
                dataset_size=n, parameters=[(tuple(p.shape), str(p.dtype)) for p in params]))

        # 2. attach
        if ranks is not None:
            ranks.attach(module)  # rank 0's parameters for all; a DDP model kept off the wire
        self._distributed = ranks
        self._amp = ScalerLink(grad_scaler) if grad_scaler is not None else None
        self.settings = settings
        self.performance = PerformanceSettings(mode)
        self._dataset_size = n
        self._module, self._optimizer = module, optimizer
        # Sparse embedding sums only where they go straight into the fused noise buffer.
        self._clipped = ClippedSum(params, bound, clipping,
                                   sparse_sums=ranks is None and self.noise.fuses_sums)
        self._batch_norms = [(path, m) for path, m in module.named_modules()
                             if isinstance(m, _RUNNING_STATS)]  # also InstanceNorm
        # Private training overwrites p.grad, so autograd need not form the parameter
        # gradients; but DDP's reducer and GradScaler.step expect them to exist.
        skip = grad_scaler is None and not isinstance(module, nn.parallel.DistributedDataParallel)
        self._recorder = Recorder(module, registry, self._on_backward,
                                  skip_parameter_grads=skip, early=self._materialize_early)
        self.layer_rules = {
            path or "<root>": type(registry.lookup(m)).__name__ for path, m in module.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))}
        generic = [path for path, rule in self.layer_rules.items() if rule == "GenericRule"]
        if generic:
            _log.info("privgrad: the generic torch.func rule serves %s (exact, slower than a "
                      "dedicated rule; see docs/custom_layers.md)", ", ".join(generic))
        self._recorder.attach()
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            module.register_forward_pre_hook(self._before_forward),
        ]
        _ATTACHED.add(module)
        _ATTACHED.add(optimizer)
        if poisson_sampling:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # follows manual_seed
            if ranks is not None:
                seed = ranks.broadcast_seed(seed)  # one global sample per step for the job
            bits = os_bits if self.secure_mode else numpy_bits(seed)
            sampler = PoissonSampler(n, q, bits=bits, steps=steps_per_epoch(q))
            self._sampler, self._sampler_seed = sampler, (None if self.secure_mode else seed)
            if ranks is not None:
                sampler = ranks.shard(sampler)  # this rank's share: indices i % world == rank
            data_loader = poisson_loader(data_loader, sampler)
        return module, optimizer, data_loader

    def make_private_with_epsilon(
        self, *, module, optimizer, data_loader, target_epsilon: float, target_delta: float,
        epochs: int, max_grad_norm, **kwargs,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Like :meth:`make_private`, with the smallest noise that keeps epsilon at or below
        ``target_epsilon`` after ``epochs`` epochs (per this engine's accountant)."""
        eps = _validate.positive("target_epsilon", target_epsilon, "Pass the privacy budget, e.g. 3.0.")
        delta = _validate.open_unit("target_delta", target_delta,
                                    "Pass a delta well below 1/N, e.g. 1e-5.")
        epochs = _validate.positive_int("epochs", epochs, "Pass the number of training epochs.")
        poisson = kwargs.get("poisson_sampling", True)
        check_loader(data_loader, poisson)
        n = _dataset_size(data_loader, poisson, kwargs.get("sample_rate"),
                          kwargs.get("expected_batch_size"))
        q, _ = _sampling_rate(data_loader, n, kwargs.get("sample_rate"),
                              kwargs.get("expected_batch_size"),
                              kwargs.get("loss_reduction", "mean"), poisson)
        if n is not None:
            _warn_large_delta(delta, n, "target_delta")
        sigma = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q,
                                     steps=epochs * steps_per_epoch(q),
                                     accountant=self.accountant.name)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    @property
    def module(self) -> nn.Module | None:
        """The model this engine privatises (``None`` before ``make_private``/after ``detach``)."""
        return self._module

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer this engine privatises (``None`` before ``make_private``/after ``detach``)."""
        return self._optimizer

    @property
    def data_parallel(self) -> bool:
        """Whether ``make_private`` attached this engine to a ``torch.distributed`` job."""
        return self._distributed is not None

    # -- the budget ------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before the first step)."""
        delta = _validate.open_unit("delta", delta, "Pass a delta well below 1/N, e.g. 1e-5.")
        if self._dataset_size is not None:
            _warn_large_delta(delta, self._dataset_size, "delta")
        return self.accountant.get_epsilon(delta=delta)

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler=None, extra=None) -> None:
        """Write model, optimizer, scheduler, accountant, sampler and counters to ``path``,
        atomically (see :func:`privgrad.checkpoint.save_checkpoint`)."""
        _checkpoint.save_checkpoint(self, path, module=module, optimizer=optimizer,
                                    scheduler=scheduler, extra=extra)

    def load_checkpoint(self, path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler=None, restore_rng: bool = True):
        """Resume from ``path`` after ``make_private`` with the same settings; return the saved
        ``extra`` (see :func:`privgrad.checkpoint.load_checkpoint`)."""
        return _checkpoint.load_checkpoint(self, path, module=module, optimizer=optimizer,
                                           scheduler=scheduler, restore_rng=restore_rng)

    # -- virtual batches -------------------------------------------------------------------
    @contextmanager
    def virtual_batches(self, data_loader, max_physical_batch_size: int):
        """Split each logical batch into physical chunks of at most ``max_physical_batch_size``.

        Run the ordinary loop (forward, backward, ``optimizer.step()``) on every chunk: only the
        last chunk of a logical batch releases a noisy update; the earlier steps make none.
        """
        size = _validate.positive_int("max_physical_batch_size", max_physical_batch_size,
                                      "Pass the largest batch that fits in memory, e.g. 64.")
        try:
            yield VirtualBatches(data_loader, size, self._set_release)
        finally:
            self._release_now = True

    def _set_release(self, last_chunk: bool) -> None:
        self._release_now = last_chunk

    # -- hooks -----------------------------------------------------------------------------
    def _before_forward(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return
        for path, m in self._batch_norms:
            if m.training and m.track_running_stats:
                fix = ("replace it with GroupNorm (privgrad.fix)" if isinstance(
                    m, nn.modules.batchnorm._BatchNorm) else
                    "construct it with track_running_stats=False (privgrad.fix)")
                raise ModelValidationError(
                    f"module {path} ({type(m).__name__}) is in training mode, so its running "
                    f"statistics would learn from private data; got model.train() with "
                    f"track_running_stats=True. Call {path or 'model'}.eval() after "
                    f"model.train(), or {fix}.")

    def _materialize_early(self, capture) -> bool:
        # not under a GradScaler: its captured gradients are unscaled at the end of the pass
        return self._amp is None and materialize_early(capture, self.performance.grad_sample_mode)

    def _on_backward(self, captures) -> None:
        if self._amp is not None and self._backward_since_step:  # GradScaler skipped the step
            self._amp.discard(self._clipped)
            self._backward_since_step = False
        if self._backward_since_step:
            raise PrivacyStateError(
                "one backward pass per optimizer.step() is allowed; got a second backward pass "
                "before the step. A second pass on the same examples would clip them twice, and "
                "one on another batch would put two samples under one noise draw; either "
                "breaks the guarantee. Combine the losses into one before backward(), or split "
                "a large batch with engine.virtual_batches(...), which steps per chunk.")
        self._backward_since_step = True
        loss_scale = self._amp.loss_scale() if self._amp is not None else 1.0
        batch = BackwardBatch(float32_captures(captures, loss_scale),  # AMP: float32, unscaled
                              mode=self.performance.grad_sample_mode,
                              scale_by_batch=self.settings.loss_reduction == "mean",
                              paths=self._recorder.paths)
        params = _privatised(self._optimizer)
        self._clipped.add(batch, set(params))
        for c in captures:  # the clipped sums are formed: a kept `loss` must not hold these
            c.release()
        if self._amp is not None:
            self._amp.hide_raw_gradients(params)

    def _before_step(self, optimizer, args, kwargs):
        replaced = None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: optimizer
        if closure is not None:
            # optimizer.step(closure) (LBFGS, Lightning): step pre-hooks run before the optimizer
            # calls the closure, whose backward would then leave the raw gradient in p.grad.
            # Run it here, privatise its gradients, and give the optimizer a closure that only
            # returns the same loss.
            with torch.enable_grad():
                loss = closure()
            replaced = (args if "closure" in kwargs else args[:1] + args[2:],
                        {**kwargs, "closure": lambda: loss})
        params = _privatised(optimizer)
        self._backward_since_step = False
        if not self._release_now:  # an earlier chunk of a virtual batch: no update yet
            for p in params:
                p.grad = None
            return replaced
        _check_ownership(self._module, optimizer)
        s = self.settings
        # Data-parallel: reduce_sums adds the ranks' clipped sums up on rank 0, which alone draws
        # the noise, on that total, as one process would; every rank then gets rank 0's release.
        sums = self.reduce_sums(self._clipped.sums)
        noise_std = (s.noise_std if self._distributed is None
                     else self._distributed.noise_share(s.noise_std))
        grads = noisy_gradients(params, sums, noise_std=noise_std,
                                normaliser=self.normaliser(), noise=self.noise)
        if self._distributed is not None:
            grads = self._distributed.broadcast_release(grads)
        for p in params:
            p.grad = grads[p]
        self.accountant.step(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate)
        self.steps += 1
        self.last_step_stats = self._clipped.stats
        self.dropped_examples += self.last_step_stats.dropped
        self._clipped.reset()
        return replaced

    def normaliser(self) -> float:
        """What the noisy sum is divided by: the *expected* batch size for a mean-reduced loss
        (never the realised one, which depends on the sample), 1 for a summed loss."""
        return self.settings.normaliser

    def reduce_sums(self, sums: dict) -> dict:
        """The cross-process sum of clipped sums (identity in a single process). In
        data-parallel training the total lands on rank 0 and the other ranks get an empty dict:
        they receive rank 0's release instead (see :mod:`privgrad.distributed`)."""
        if self._distributed is None:
            return sums
        return self._distributed.reduce_sums(sums, _privatised(self._optimizer))

    # -- detaching -------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook; the model and optimizer are plain PyTorch objects again."""
        if self._distributed is not None:
            self._distributed.detach()  # a DDP model gets its gradient all-reduce back
            self._distributed = None
        if self._recorder is not None:
            self._recorder.detach()
        for h in self._handles:
            h.remove()
        self._handles = []
        for obj in (self._module, self._optimizer):
            if obj is not None:
                _ATTACHED.discard(obj)
        self._module = self._optimizer = self._recorder = None


# -- argument checks (pure functions of the arguments) ----------------------------------------
def _privatised(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters that require grad, in order, without repeats."""
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p not in seen:
                seen.add(p)
                out.append(p)
    return out


def _check_bound(max_grad_norm, clipping: str, num_params: int):
    fix = "Pass the per-sample L2 clipping bound, e.g. 1.0."
    if isinstance(max_grad_norm, Sequence) and not isinstance(max_grad_norm, str):
        if clipping != "per_layer":
            raise _validate.fail("a list of bounds needs clipping='per_layer'", "max_grad_norm",
                                 max_grad_norm, "Pass one float, or clipping='per_layer'.")
        bounds = tuple(_validate.positive("max_grad_norm", c, fix) for c in max_grad_norm)
        if len(bounds) != num_params:
            raise _validate.fail(
                f"per-layer bounds must number the optimizer's {num_params} trainable "
                f"parameters", "max_grad_norm", max_grad_norm,
                "Pass one bound per parameter (optimizer order), or one float to split equally.")
        return bounds
    return _validate.positive("max_grad_norm", max_grad_norm, fix)


def _dataset_size(data_loader: DataLoader, poisson_sampling: bool, sample_rate,
                  expected_batch_size) -> int | None:
    """``len(data_loader.dataset)``; ``None`` for a data set without a length when nothing
    needs the size (Poisson sampling off, and ``sample_rate`` and ``expected_batch_size``
    given)."""
    try:
        n = len(data_loader.dataset)
    except TypeError as e:
        if not poisson_sampling and None not in (sample_rate, expected_batch_size):
            return None
        raise ConfigError(
            f"the data set must have a length; got data_loader.dataset="
            f"{type(data_loader.dataset).__name__} without __len__. Use a map-style Dataset, "
            f"or pass poisson_sampling=False with sample_rate= and expected_batch_size= (the "
            f"accounting then assumes Poisson sampling at that rate).") from e
    if n == 0:
        raise _validate.fail("the data set must not be empty", "len(data_loader.dataset)", n,
                             "Check the data loading code.")
    return n


def _sampling_rate(data_loader, n: int, sample_rate, expected_batch_size, loss_reduction: str,
                   poisson: bool) -> tuple[float, float]:
    """``(q, expected batch size)``, from the loader (size public) or given (size private)."""
    if sample_rate is not None or expected_batch_size is not None:
        if sample_rate is None or (expected_batch_size is None and loss_reduction == "mean"):
            raise _validate.fail(
                "sample_rate and expected_batch_size go together (they declare the data set's "
                "size private)", "sample_rate, expected_batch_size",
                (sample_rate, expected_batch_size), "Pass both, or neither.")
        q = _validate.unit_interval_right_closed("sample_rate", sample_rate,
                                                 "Pass the per-step inclusion probability.")
        expected = (_validate.positive("expected_batch_size", expected_batch_size,
                                       "Pass the batch size you expect on average.")
                    if expected_batch_size is not None else q * n)
        return q, expected
    batch_size = data_loader.batch_size
    if batch_size is None:
        raise _validate.fail(
            "the data loader must have a batch_size", "data_loader.batch_size", None,
            "Build it with DataLoader(dataset, batch_size=...), or pass sample_rate and "
            "expected_batch_size.")
    if batch_size > n:
        raise _validate.fail(
            f"batch_size must be at most the data set's size ({n})", "batch_size", batch_size,
            f"Use a batch size <= {n}.")
    return batch_size / n, float(batch_size)


def _check_ownership(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer parameters must belong to the module, and trainable module parameters must be
    in the optimizer (their autograd gradients would otherwise sit unprivatised in ``.grad``)."""
    owned = {p: name for name, p in module.named_parameters()}
    in_optimizer = {p for g in optimizer.param_groups for p in g["params"]}
    stray = [p for p in in_optimizer if p not in owned]
    if stray:
        shapes = ", ".join(str(tuple(p.shape)) for p in stray[:5])
        raise ConfigError(
            f"every optimizer parameter must belong to the module; got {len(stray)} that do not "
            f"(shapes {shapes}). Build the optimizer from module.parameters().")
    left_out = [name for p, name in owned.items() if p.requires_grad and p not in in_optimizer]
    if left_out:
        raise ConfigError(
            f"every trainable module parameter must be in the optimizer; got "
            f"{', '.join(left_out[:5])} left out. Add them to the optimizer or freeze them "
            f"(requires_grad_(False)).")


def _warn_large_delta(delta: float, n: int, name: str) -> None:
    if delta >= 1.0 / n:
        warnings.warn(
            f"{name}={delta:g} is at least 1/N = {1.0 / n:g}: a mechanism that publishes one "
            f"random example outright meets such a delta. Use delta well below 1/N, e.g. "
            f"{10 ** math.floor(math.log10(0.1 / n)):g}.", PrivacyWarning, stacklevel=3)
