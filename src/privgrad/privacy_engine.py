"""``PrivacyEngine``: one call makes a training loop differentially private.

This is the one stateful place that wires the rooms together: sampling (Poisson batches), the
engine (per-sample norms and sums, and the guards that check them), privatize (clipping, noise,
the gradient written to ``p.grad``) and accounting. The model and the optimizer stay the user's
own objects: privgrad adds forward hooks to the model, tensor hooks to its outputs and step hooks
to the optimizer, and :meth:`PrivacyEngine.detach` removes them all.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader

from privgrad import _validate
from privgrad import checkpoint as _checkpoint
from privgrad import run_state
from privgrad import settings as _settings
from privgrad.accounting import get_noise_multiplier, make_accountant
from privgrad.distributed import DataParallel, data_parallel, privacy_fingerprint
from privgrad.engine.amp import ScalerLink, check_grad_scaler, float32_captures
from privgrad.engine.batch import MODES, BackwardBatch, materialize_early
from privgrad.engine.capture import Recorder
from privgrad.engine.guard import StateGuard
from privgrad.engine.rows import DrawnRows
from privgrad.engine.selfcheck import check_sums
from privgrad.errors import ConfigError, ModelValidationError, PrivacyStateError
from privgrad.layers import RuleRegistry
from privgrad.privatize import CLIPPING, ClippedSum, StepStats, TorchGaussian, noisy_gradients
from privgrad.sampling import PoissonSampler, numpy_bits, os_bits, steps_per_epoch
from privgrad.sampling.loader import DrawnBatches, check_loader, poisson_loader
from privgrad.sampling.virtual import VirtualBatches
from privgrad.settings import PerformanceSettings, PrivacySettings, PrivacyWarning
from privgrad.validation import validate
from privgrad.validation.writers import WRITER_TYPES, writes_state

__all__ = ["PrivacyEngine", "PrivacySettings", "PerformanceSettings", "PrivacyWarning"]

# Opacus's grad_sample_mode names, accepted so that switching is a change of import.
_MODE_ALIASES = {"hooks": "materialize", "functorch": "materialize", "ew": "materialize",
                 "ghost": "auto"}
CHECKS = ("first_step", "every_step")
_log = logging.getLogger("privgrad")

# Modules and optimizers under a privacy engine (weak: a dropped model leaves no trace).
_ATTACHED: weakref.WeakSet = weakref.WeakSet()


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
        passed explicitly. docs/privacy.md says what the engine checks at run time and what it
        cannot.
    """

    privgrad_hooks = True  # its module hooks are privgrad's own (see engine.capture)

    #: Attributes that must survive a restart: each is in :meth:`state_dict` (attribute -> key).
    SAVED = {
        "accountant": "accountant", "secure_mode": "secure_mode", "noise": "noise",
        "settings": "settings", "steps": "steps", "dropped_examples": "dropped_examples",
        "_dataset_size": "dataset_size", "_sampler": "sampler", "_sampler_seed": "sampler",
        "_amp": "grad_scaler",
    }
    #: Attributes that are not saved, and why (a test fails on an attribute in neither table).
    NOT_SAVED = {
        "performance": "performance settings may change on resume (they never change epsilon)",
        "check": "a resumed run checks its per-sample gradients again",
        "last_step_stats": "monitoring of the last step only",
        "layer_rules": "a report, made again by make_private",
        "_module": "structure: the objects passed to make_private",
        "_optimizer": "structure: the objects passed to make_private",
        "_recorder": "structure: hooks, made by make_private",
        "_guard": "structure: hooks, made by make_private",
        "_handles": "structure: hooks, made by make_private",
        "_distributed": "structure: the process group, joined by make_private",
        "_clipped": "per-step sums: state_dict refuses in the middle of a step",
        "_rows": "per-step rows: state_dict refuses in the middle of a step",
        "_release_now": "per-step: state_dict refuses inside a virtual batch",
        "_backward_since_step": "per-step: state_dict refuses in the middle of a step",
        "_checking": "a resumed run checks its per-sample gradients again",
        "_checked": "a resumed run checks its per-sample gradients again",
        "_bounded": "derived from the settings by make_private",
        "_autocast": "per forward pass",
    }

    def __init__(self, accountant: str = "pld", secure_mode: bool = False):
        self.accountant = make_accountant(accountant)
        self.secure_mode = bool(secure_mode)
        self.noise = self._noise_source(seed=None)
        self.settings: PrivacySettings | None = None
        self.performance: PerformanceSettings | None = None
        self.check = "first_step"
        self.steps = 0
        self.last_step_stats: StepStats | None = None
        self.dropped_examples = 0  # non-finite examples dropped so far (monitoring, not private)
        self.layer_rules: dict[str, str] = {}  # module path -> rule serving it (a report)
        self._dataset_size: int | None = None
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._recorder: Recorder | None = None
        self._guard: StateGuard | None = None
        self._clipped: ClippedSum | None = None
        self._rows = DrawnRows(None)  # the logical step's rows against the drawn batches
        self._handles: list = []
        self._release_now = True  # False while a virtual batch's earlier chunks run
        self._backward_since_step = False  # at most one backward pass per optimizer step
        self._distributed: DataParallel | None = None  # data-parallel training only
        self._amp: ScalerLink | None = None  # a GradScaler's loss scale (mixed precision)
        self._sampler: PoissonSampler | None = None  # the loader's sampler (for checkpoints)
        self._sampler_seed: int | None = None  # None in secure mode (OS randomness)
        self._checking = False  # the self-check runs on the next backward pass with examples
        self._checked: frozenset = frozenset()  # parameters the self-check has covered
        self._bounded: frozenset = frozenset()  # per-layer clipping: parameters with a bound
        self._autocast = False  # the checked forward pass ran under autocast

    def _noise_source(self, seed: int | None):
        if not self.secure_mode:
            return TorchGaussian(seed=seed)
        from privgrad.privatize.secure import SecureGaussian

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
        check: str = "first_step",
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
            check: when to check that the per-sample gradients add up to autograd's gradient
                (:mod:`privgrad.engine.selfcheck`): ``"first_step"`` (default: the first
                backward pass with examples, and again after the trainable parameters change)
                or ``"every_step"`` (debugging a custom rule; each checked pass costs autograd's
                parameter gradients). Neither changes epsilon or the update.

        Returns:
            ``(module, optimizer, data_loader)``, always three values.

        Privacy:
            See the class docstring. Nothing is attached if any argument is refused. From here
            on the engine refuses, before anything is released: a forward or backward pass that
            writes model state (:mod:`privgrad.engine.guard`), per-sample gradients that do not
            add up (:mod:`privgrad.engine.selfcheck`), rows that are not one drawn batch
            (:mod:`privgrad.engine.rows`), a step without a backward pass, and, under per-layer
            clipping, a parameter trainable after this call (its bound is fixed now).
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
        check = _validate.choice("check", check, CHECKS)
        registry = rules if rules is not None else RuleRegistry.default()
        if not isinstance(module, nn.Module):
            raise _validate.fail("module must be a torch.nn.Module", "module",
                                 type(module).__name__, "Pass your model.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise _validate.fail("optimizer must be a torch.optim.Optimizer", "optimizer",
                                 type(optimizer).__name__, "Pass your optimizer.")
        params = _settings.privatised(optimizer)
        if not params:
            raise ConfigError(
                "private training needs at least one trainable parameter in the optimizer; got "
                "none that requires grad. Unfreeze what you want to train (requires_grad_(True)) "
                "and build the optimizer over it.")
        bound = _settings.check_bound(max_grad_norm, clipping, len(params))
        grad_scaler = check_grad_scaler(grad_scaler)
        ranks = data_parallel(distributed, module, poisson_sampling)
        check_loader(data_loader, poisson_sampling)
        n = _settings.dataset_size(data_loader, poisson_sampling, sample_rate,
                                   expected_batch_size)
        q, expected = _settings.sampling_rate(data_loader, n, sample_rate, expected_batch_size,
                                              loss_reduction, poisson_sampling)
        _settings.check_ownership(module, optimizer)
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
            import warnings

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
        self.check = check
        self._dataset_size = n
        self._module, self._optimizer = module, optimizer
        # Sparse embedding sums only where they go straight into the fused noise buffer.
        fuses = not self.secure_mode
        self._clipped = ClippedSum(params, bound, clipping, sparse_sums=ranks is None and fuses)
        self._bounded = frozenset(params) if clipping == "per_layer" else frozenset()
        drawn = DrawnBatches() if poisson_sampling else None
        self._rows = DrawnRows(drawn)
        # Private training overwrites p.grad, so autograd need not form the parameter
        # gradients; but DDP's reducer and GradScaler.step expect them to exist.
        skip = grad_scaler is None and not isinstance(module, nn.parallel.DistributedDataParallel)
        self._recorder = Recorder(module, registry, self._on_backward, skip_parameter_grads=skip,
                                  early=self._materialize_early, tag=self._rows.tag)
        self.layer_rules = {
            path or "<root>": type(registry.lookup(m)).__name__ for path, m in module.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))}
        generic = [path for path, rule in self.layer_rules.items() if rule == "GenericRule"]
        if generic:
            _log.info("privgrad: the generic torch.func rule serves %s (exact, slower than a "
                      "dedicated rule; see docs/custom_layers.md)", ", ".join(generic))
        self._recorder.attach()
        self._guard = StateGuard(module, writes_state, WRITER_TYPES,
                                 on_forward=self._forward_starts)
        self._guard.attach()
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        self._checking = True
        for p in params:  # the first private step overwrites them; the self-check needs None
            p.grad = None
        _ATTACHED.add(module)
        _ATTACHED.add(optimizer)
        # Seeds follow torch.manual_seed; the noise then has its own generator (privatize.noise)
        seed, noise_seed = (int(s) for s in torch.randint(0, 2**62, (2,), dtype=torch.int64))
        self.noise = self._noise_source(seed=noise_seed)
        if poisson_sampling:
            if ranks is not None:
                seed = ranks.broadcast_seed(seed)  # one global sample per step for the job
            bits = os_bits if self.secure_mode else numpy_bits(seed)
            sampler = PoissonSampler(n, q, bits=bits, steps=steps_per_epoch(q))
            self._sampler, self._sampler_seed = sampler, (None if self.secure_mode else seed)
            if ranks is not None:
                sampler = ranks.shard(sampler)  # this rank's share: indices i % world == rank
            data_loader = poisson_loader(data_loader, sampler, drawn)
        return module, optimizer, data_loader

    def make_private_with_epsilon(
        self, *, module, optimizer, data_loader, target_epsilon: float, target_delta: float,
        max_grad_norm, epochs: int | None = None, steps: int | None = None, **kwargs,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Like :meth:`make_private`, with the smallest noise that keeps epsilon at or below
        ``target_epsilon`` after ``epochs`` epochs, or after ``steps`` steps (give exactly one;
        per this engine's accountant)."""
        eps = _validate.positive("target_epsilon", target_epsilon, "Pass the privacy budget, e.g. 3.0.")
        delta = _validate.open_unit("target_delta", target_delta,
                                    "Pass a delta well below 1/N, e.g. 1e-5.")
        if (epochs is None) == (steps is None):
            raise _validate.fail(
                "exactly one of epochs and steps must be given", "(epochs, steps)",
                (epochs, steps), "Pass epochs=<training epochs> or steps=<optimizer steps>.")
        poisson = kwargs.get("poisson_sampling", True)
        check_loader(data_loader, poisson)
        n = _settings.dataset_size(data_loader, poisson, kwargs.get("sample_rate"),
                                   kwargs.get("expected_batch_size"))
        q, _ = _settings.sampling_rate(data_loader, n, kwargs.get("sample_rate"),
                                       kwargs.get("expected_batch_size"),
                                       kwargs.get("loss_reduction", "mean"), poisson)
        if n is not None:
            _settings.warn_large_delta(delta, n, "target_delta")
        if steps is None:
            epochs = _validate.positive_int("epochs", epochs, "Pass the number of training epochs.")
            steps = epochs * steps_per_epoch(q)
        steps = _validate.positive_int("steps", steps, "Pass the number of optimizer steps.")
        sigma = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q,
                                     steps=steps, accountant=self.accountant.name)
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
            _settings.warn_large_delta(delta, self._dataset_size, "delta")
        return self.accountant.get_epsilon(delta=delta)

    # -- the state of the run --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything of the privacy run that must survive a restart (see
        :mod:`privgrad.run_state`): settings, accountant, sampler seed and position, the noise
        generators, counters and the GradScaler link. Plain data and tensors only.

        Raises:
            PrivacyStateError: before ``make_private``, in the middle of a step, or after the
                state guard caught a write.
        """
        return run_state.state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Continue the run :meth:`state_dict` described, after ``make_private`` with the same
        settings and before the first step. Checks everything before changing anything.

        Raises:
            CheckpointError: another configuration, model or accountant.
            PrivacyStateError: this engine has released steps already (they would go
                unaccounted), or is in the middle of a step.
        """
        run_state.load_state_dict(self, state)

    def save_checkpoint(self, path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler=None, extra=None) -> None:
        """Write model, optimizer, scheduler and :meth:`state_dict` to ``path``, atomically
        (see :func:`privgrad.checkpoint.save_checkpoint`)."""
        _checkpoint.save_checkpoint(self, path, module=module, optimizer=optimizer,
                                    scheduler=scheduler, extra=extra)

    def load_checkpoint(self, path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler=None, restore_rng: bool = True):
        """Resume from ``path`` after ``make_private`` with the same settings; return the saved
        ``extra`` (see :func:`privgrad.checkpoint.load_checkpoint`). The sampler and the noise
        always continue where the saved run stopped; ``restore_rng`` restores PyTorch's own
        random states too (dropout, augmentation)."""
        return _checkpoint.load_checkpoint(self, path, module=module, optimizer=optimizer,
                                           scheduler=scheduler, restore_rng=restore_rng)

    # -- virtual batches -------------------------------------------------------------------
    @contextmanager
    def virtual_batches(self, data_loader, max_physical_batch_size: int):
        """Split each logical batch into physical chunks of at most ``max_physical_batch_size``.

        Run the ordinary loop (forward, backward, ``optimizer.step()``) on every chunk: only the
        last chunk of a logical batch releases a noisy update; the earlier steps make none.
        Leaving the loop in the middle of a logical batch discards its clipped sums: nothing
        of it is released and nothing is spent.
        """
        size = _validate.positive_int("max_physical_batch_size", max_physical_batch_size,
                                      "Pass the largest batch that fits in memory, e.g. 64.")
        try:
            yield VirtualBatches(data_loader, size, self._set_release, self._abandon)
        finally:
            self._abandon()

    def _set_release(self, last_chunk: bool) -> None:
        self._release_now = last_chunk

    def _abandon(self) -> None:
        """The virtual batches ended: a logical batch left unfinished releases nothing."""
        self._release_now = True
        if self._clipped is not None and self._clipped.stats.backward_passes:
            self._clipped.reset()
            self._rows.reset()

    # -- hooks -----------------------------------------------------------------------------
    def _forward_starts(self) -> None:
        """The outermost module call of a forward pass starts (the root or any submodule)."""
        if _in_backward():  # a recomputation (non-reentrant activation checkpointing)
            return
        checked = self._checked
        if self.check == "every_step" or any(  # parameters the self-check has not covered
                p.requires_grad and p not in checked
                for group in self._optimizer.param_groups for p in group["params"]):
            params = _settings.privatised(self._optimizer)
            self._refuse_unbounded([p for p in params if p not in checked])
            self._checking = True
        self._guard.watch_values = self._checking  # native writes the version misses
        if self._checking:
            self._autocast = _autocast_on()
            if self._clipped.stats.backward_passes == 0:
                for p in _settings.privatised(self._optimizer):  # for the self-check: autograd's
                    p.grad = None                               # gradient of this pass alone
        self._recorder.checking = self._checking

    def _refuse_unbounded(self, params) -> None:
        if not self._bounded:
            return
        names = None
        late = [p for p in params if p not in self._bounded]
        if late:
            names = self._names()
            listed = ", ".join(names.get(p, str(tuple(p.shape))) for p in late[:5])
            raise PrivacyStateError(
                f"per-layer clipping fixes one bound per parameter when the guarantee is set; got "
                f"{listed} trainable after make_private (requires_grad_(True) or "
                f"optimizer.add_param_group). A fresh bound would raise the sensitivity above the "
                f"C the noise is calibrated to. Use clipping='flat' (its one bound covers any set "
                f"of parameters), or make them trainable before make_private. Nothing was "
                f"released.")

    def _materialize_early(self, capture) -> bool:
        # not under a GradScaler: its captured gradients are unscaled at the end of the pass
        return self._amp is None and materialize_early(capture, self.performance.grad_sample_mode)

    def _on_backward(self, captures) -> None:
        self._guard.after_backward()
        if self._amp is not None and self._backward_since_step:
            self._amp.discard(self._clipped)  # GradScaler skipped the step: nothing released
            self._rows.reset()
            self._backward_since_step = False
        if self._backward_since_step:
            raise PrivacyStateError(
                "one backward pass per optimizer.step() is allowed; got a second backward pass "
                "before the step. A second pass on the same examples would clip them twice, and "
                "one on another batch would put two samples under one noise draw; either "
                "breaks the guarantee. Combine the losses into one before backward(), or split "
                "a large batch with engine.virtual_batches(...), which steps per chunk.")
        params = _settings.privatised(self._optimizer)
        try:
            self._add_backward(captures, params)
            self._backward_since_step = True
        finally:
            for c in captures:  # the clipped sums are formed: a kept `loss` must not hold these
                c.release()
            # No raw gradient stays in p.grad: another optimizer stepped now would apply it.
            # Queued behind every callback of this backward pass: DDP's reducer copies its
            # buckets (the local gradient) back into p.grad in a callback of its own.
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self._hide_raw_gradients(params))

    def _hide_raw_gradients(self, params) -> None:
        if self._amp is not None:
            self._amp.hide_raw_gradients(params)
        else:
            for p in params:
                p.grad = None

    def _add_backward(self, captures, params) -> None:
        """Check one backward pass and add its clipped sums; on a refusal nothing is added."""
        self._refuse_unbounded(params)
        loss_scale = self._amp.loss_scale() if self._amp is not None else 1.0
        batch = BackwardBatch(float32_captures(captures, loss_scale),  # AMP: float32, unscaled
                              mode=self.performance.grad_sample_mode,
                              scale_by_batch=self.settings.loss_reduction == "mean",
                              paths=self._recorder.paths)
        self._rows.add({c.tag for c in captures}, batch.batch_size)
        if self._checking and self._recorder.checking:
            if check_sums(batch, params, self._names(), loss_scale=loss_scale,
                          loose=self._autocast):
                self._checked = self._checked | frozenset(params)
                self._checking = self.check == "every_step"
                self._recorder.checking = self._checking
        self._clipped.add(batch, set(params))

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
        self._guard.check_clean()
        params = _settings.privatised(optimizer)
        self._backward_since_step = False
        if not self._release_now:  # an earlier chunk of a virtual batch: no update yet
            for p in params:
                p.grad = None
            return replaced
        if self._clipped.stats.backward_passes == 0:
            raise PrivacyStateError(
                "optimizer.step() must follow a backward pass through the model; got a step with "
                "no backward pass since the last one. It would release pure noise and spend "
                "budget for nothing. Call loss.backward() first (an empty Poisson batch too: "
                "run the model on it). Nothing was released.")
        _settings.check_ownership(self._module, optimizer)
        try:
            self._rows.release()
        except PrivacyStateError:
            self._clipped.reset()  # refused: nothing released, nothing kept for the next step
            self._rows.reset()
            raise
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

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._guard.after_step()  # the optimizer's writes are the private step's own

    def _names(self) -> dict:
        return {p: name for name, p in self._module.named_parameters()}

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
        return self._distributed.reduce_sums(sums, _settings.privatised(self._optimizer))

    # -- detaching -------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook; the model and optimizer are plain PyTorch objects again."""
        if self._distributed is not None:
            self._distributed.detach()  # a DDP model gets its gradient all-reduce back
            self._distributed = None
        if self._recorder is not None:
            self._recorder.detach()
        if self._guard is not None:
            self._guard.detach()
        for h in self._handles:
            h.remove()
        self._handles = []
        for obj in (self._module, self._optimizer):
            if obj is not None:
                _ATTACHED.discard(obj)
        self._module = self._optimizer = self._recorder = self._guard = None


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread now."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _autocast_on() -> bool:
    """Whether a forward pass starting now runs under autocast (on any device type)."""
    for device in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device):
                return True
        except TypeError:  # torch < 2.4: no device argument
            return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return False
