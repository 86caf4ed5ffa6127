"""``PrivacyEngine``: one call makes a training loop differentially private.

This is the one stateful place that wires the rooms together: sampling (the plan and the Poisson
loader), the engine (per-sample norms and sums, and the guards that check them), privatize
(clipping, noise, the release written to ``p.grad``) and accounting. What runs during training
is in ``privgrad.training_hooks``; the arguments are checked in ``privgrad.settings`` and
``privgrad.sampling.plan``; the state a restart needs in [`privgrad.run_state`][privgrad.run_state].
The model and the optimizer stay the user's own objects: privgrad adds forward hooks to the model,
tensor hooks to its outputs and step hooks to the optimizer, and
[`PrivacyEngine.detach()`][privgrad.PrivacyEngine.detach] removes them all.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader

from privgrad import _validate, attachment, mechanism_run, run_state, settings as _settings
from privgrad.accounting import make_accountant
from privgrad.distributed import DataParallel, data_parallel, privacy_fingerprint
from privgrad.engine.amp import ScalerLink, check_grad_scaler
from privgrad.engine.capture import Recorder
from privgrad.engine.clipped_sum import ClippedSum, StepStats
from privgrad.engine.compiled import eager
from privgrad.engine.guard import StateGuard
from privgrad.engine.rows import DrawnRows
from privgrad.errors import ModelValidationError, PrivacyStateError
from privgrad.layers import RuleRegistry
from privgrad.privatize import NoiseSource, noise_source
from privgrad.privatize.adaptive import ADAPTIVE, QuantileBound, default_count_noise
from privgrad.releases import Releases
from privgrad.sampling import PoissonSampler, users as units
from privgrad.sampling.plan import SamplingPlan
from privgrad.settings import PerformanceSettings, PrivacySettings, PrivacyWarning
from privgrad.training_hooks import TrainingHooks
from privgrad.validation import validate
from privgrad.validation.writers import WRITER_TYPES, writes_state

__all__ = ["PrivacyEngine", "PrivacySettings", "PerformanceSettings", "PrivacyWarning"]

_log = logging.getLogger("privgrad")

_MAKE_PRIVATE = ("clipping", "loss_reduction", "poisson_sampling", "sample_rate",
                 "expected_batch_size", "grad_sample_mode", "rules", "distributed", "grad_scaler",
                 "check", "gamma", "target_quantile", "quantile_lr", "count_noise_std",
                 "mechanism", "privacy_unit", "user_ids", "max_examples_per_user",
                 "max_batch_size")


class PrivacyEngine(TrainingHooks, run_state.RunState, Releases):
    """Makes a model, optimizer and data loader train with DP-SGD, and tracks the budget.

    Args:
        accountant: ``"pld"`` (default, tight) or ``"rdp"``.
        secure_mode: draw sampling and noise from a CSPRNG seeded by the operating system,
            with noise that resists floating-point attacks (docs/reliability.md; needs
            ``pip install 'privgrad[secure]'``). Off by default, so that runs are reproducible
            after ``torch.manual_seed``. Shorthand for ``noise=SecureGaussian()`` plus
            OS-random sampling.
        noise: the noise source ([`NoiseSource`][privgrad.privatize.source.NoiseSource]; default
            [`TorchGaussian`][privgrad.privatize.noise.TorchGaussian]), seeded for the run at
            ``make_private``.

    Privacy:
        (epsilon, delta)-DP under add/remove-one-example adjacency (one user's rows with
        ``privacy_unit="user"``) for the released noisy gradients, assuming Poisson sampling (the
        default loader), that each example's loss depends on that example only (no batch
        statistics) and that the data set's size is public unless ``sample_rate`` and
        ``expected_batch_size`` are passed. docs/privacy.md says what the engine checks at run
        time and what it cannot.
    """

    privgrad_hooks = True  # its module hooks are privgrad's own (see engine.capture)

    def __init__(self, accountant: str = "pld", secure_mode: bool = False,
                 noise: NoiseSource | None = None):
        self.accountant = make_accountant(_settings.check_accountant(accountant))
        self.secure_mode = _settings.check_flag("secure_mode", secure_mode)
        self.noise = noise_source(noise, self.secure_mode)
        self.settings: PrivacySettings | None = None
        self.performance: PerformanceSettings | None = None
        self.check = "first_step"
        self.steps = 0
        self.last_step_stats: StepStats | None = None
        self.dropped_examples = 0  # non-finite examples dropped so far (monitoring, not private)
        self.adaptive_clipping: QuantileBound | None = None  # clipping="adaptive": the bound
        self.layer_rules: dict[str, str] = {}  # module path -> rule serving it (a report)
        self.mechanism = None  # the noise mechanism (privgrad.mechanisms), set by make_private
        self._mechanism_run: mechanism_run.MechanismRun | None = None  # correlated noise only
        self._sampling: SamplingPlan | None = None
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._recorder: Recorder | None = None
        self._guard: StateGuard | None = None
        self._clipped: ClippedSum | None = None
        self._rows = DrawnRows(None)  # the logical step's rows against the drawn batches
        self._handles: list = []
        self._release_now = True  # False while a virtual batch's earlier chunks run
        self._backward_since_step = False  # at most one backward pass per optimizer step
        self._undrawn = 0  # rows of backward passes on undrawn data since the last step
        self._distributed: DataParallel | None = None  # data-parallel training only
        self._amp: ScalerLink | None = None  # a GradScaler's loss scale (mixed precision)
        self._sampler: PoissonSampler | None = None  # the loader's sampler (for checkpoints)
        self._sampler_seed: int | None = None  # None in secure mode (OS randomness)
        self._checking = False  # the self-check runs on the next backward pass with examples
        self._checked: frozenset = frozenset()  # parameters the self-check has covered
        self._bounded: frozenset = frozenset()  # per-layer clipping: parameters with a bound
        self._autocast = False  # the checked forward pass ran under autocast

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
        gamma: float | None = None,
        target_quantile: float | None = None,
        quantile_lr: float | None = None,
        count_noise_std: float | None = None,
        mechanism=None,
        steps: int | None = None,
        epochs: int | None = None,
        privacy_unit: str = "example",
        user_ids: Sequence | None = None,
        max_examples_per_user: int | None = None,
        max_batch_size: int | None = None,
        **unknown,
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
            clipping: ``"flat"``, ``"per_layer"``, ``"automatic"`` (each example scaled to
                ``C g / (||g|| + gamma)``: no bound to tune), ``"adaptive"`` (the bound,
                starting at ``max_grad_norm``, follows ``target_quantile`` of the norms, estimated
                privately each step; the release is then in units of the bound) or
                ``"per_layer_adaptive"`` (one such bound per parameter). docs/clipping.md says
                which to choose.
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
            rules: a [`RuleRegistry`][privgrad.RuleRegistry] with custom layer rules.
            distributed: data-parallel training on ``torch.distributed`` (docs/distributed.md):
                ``None`` (default) joins the default process group when one is initialised,
                ``True`` requires one, ``False`` trains this process alone. The module may be a
                ``DistributedDataParallel`` or sharded with FSDP2's ``fully_shard``. Performance
                only: the world size changes neither epsilon nor the update's distribution.
            grad_scaler: the ``torch.amp.GradScaler`` that scales the loss (fp16 mixed
                precision): the engine divides its scale out of the per-sample gradients before
                clipping and keeps private data out of its skip decision (docs/reliability.md).
            check: when to check that the per-sample gradients add up to autograd's gradient
                (``privgrad.engine.selfcheck``): ``"first_step"`` (default: the first
                backward pass with examples, and again after the trainable parameters change)
                or ``"every_step"`` (debugging a custom rule; each checked pass costs autograd's
                parameter gradients). Neither changes epsilon or the update.
            gamma: automatic clipping's stability constant (default 0.01).
            target_quantile: adaptive clipping: the share of examples the bound leaves
                unclipped (default 0.9); ``quantile_lr`` its geometric step (default 0.2);
                ``count_noise_std`` the noise on the count, in examples (default: the expected
                batch size / 20). Epsilon is that of ``noise_multiplier``: the gradient's share
                of the noise is raised to pay for the count.
            mechanism: the noise: [`DPSGD()`][privgrad.mechanisms.DPSGD] (default),
                [`BandMF(num_bands=b)`][privgrad.mechanisms.BandMF] or
                [`BLT(num_buffers=k)`][privgrad.mechanisms.BLT] (correlated noise, with cyclic
                Poisson sampling; docs/correlated_noise.md).
            steps: the run's planned number of optimizer steps (or ``epochs``): a correlated
                mechanism builds its noise for them and refuses a step beyond.
            privacy_unit: ``"example"`` (default) or ``"user"``: all the rows of one person
                (``user_ids``: one id per example; at most ``max_examples_per_user`` rows per
                user and step; ``q`` over users).
            max_batch_size: ``M``: fixed-shape truncated Poisson batches. Both: docs/privacy.md.

        Returns:
            ``(module, optimizer, data_loader)``, always three values.

        Privacy:
            See the class docstring. Nothing is attached if any argument is refused. From here
            on the engine refuses, before anything is released: a forward or backward pass that
            writes model state (``privgrad.engine.guard``), per-sample gradients that do not
            add up (``privgrad.engine.selfcheck``), rows that are not one drawn batch
            (``privgrad.engine.rows``), a step without a backward pass, and, under per-layer
            clipping, a parameter trainable after this call (its bound is fixed now).
        """
        _settings.refuse_unknown(unknown, "make_private")
        arguments = {k: v for k, v in locals().items() if k in _MAKE_PRIVATE}  # (the keywords)
        return self._attach(module, optimizer, data_loader, None, noise_multiplier=noise_multiplier,
                            max_grad_norm=max_grad_norm, steps=steps, epochs=epochs, **arguments)

    def _attach(self, module, optimizer, data_loader, planned=None, *, mechanism=None, steps=None,
                epochs=None, poisson_sampling=True, sample_rate=None, expected_batch_size=None,
                loss_reduction="mean", rules=None, distributed=None, grad_scaler=None,
                **arguments):
        per_unit = {k: arguments.pop(k) for k in units.SAMPLING_ONLY if k in arguments}
        if self._module is not None:
            raise PrivacyStateError(
                "make_private was already called on this PrivacyEngine; got a second call. Use "
                "one PrivacyEngine per training run (engine.detach() first to start over).")
        # 1. every argument, before anything changes (each validated once)
        args = _settings.check_arguments(module=module, optimizer=optimizer,
                                         loss_reduction=loss_reduction, **arguments)
        registry = rules if rules is not None else RuleRegistry.default()
        grad_scaler = check_grad_scaler(grad_scaler)
        ranks = data_parallel(distributed, module, poisson_sampling, args.params, registry)
        drawn = dict(poisson_sampling=poisson_sampling, sample_rate=sample_rate,
                     expected_batch_size=expected_batch_size)
        mechanism, sampling, steps = planned or units.refine(mechanism_run.plan(
            data_loader, mechanism, steps, epochs, **drawn, loss_reduction=args.loss_reduction),
            data_loader, epochs, clipping=args.clipping, **drawn, **per_unit,
            group_key=partial(mechanism_run.group_key, self.secure_mode))
        correlated = mechanism_run.correlated(mechanism)
        _settings.check_ownership(module, optimizer)
        attachment.refuse_attached(module, optimizer)
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
                "this training run.", PrivacyWarning, stacklevel=3)
        options = dict(args.clipping_options)
        if args.clipping in ADAPTIVE and "count_noise_std" not in options:
            counts = len(args.max_grad_norm) if args.clipping == "per_layer_adaptive" else 1
            options["count_noise_std"] = default_count_noise(sampling.expected_batch_size,
                                                             args.noise_multiplier, counts)
        settings = PrivacySettings(args.noise_multiplier, args.max_grad_norm, args.clipping,
                                   sampling.sample_rate, sampling.expected_batch_size,
                                   args.loss_reduction, poisson_sampling, **options,
                                   mechanism=mechanism_run.describe(mechanism),
                                   planned_steps=steps if correlated else None,
                                   **units.unit_settings(sampling))
        self._refuse_other_unit(settings.privacy_unit)  # releases protect the run's unit
        params = args.params
        if ranks is not None:  # the same configuration on every rank, or an error on every rank
            ranks.agree(privacy_fingerprint(
                settings, accountant=self.accountant.name, secure_mode=self.secure_mode,
                dataset_size=sampling.dataset_size,
                parameters=[(tuple(p.shape), str(p.dtype)) for p in params]))

        # 2. attach
        if ranks is not None:
            ranks.attach(module)  # rank 0's parameters for all; a DDP model kept off the wire
        self._distributed = ranks
        self._amp = ScalerLink(grad_scaler) if grad_scaler is not None else None
        self.settings, self._sampling = settings, sampling
        self.performance = PerformanceSettings(args.grad_sample_mode)
        self.check = args.check
        self._module, self._optimizer = module, optimizer
        # The bounds are fixed now, once; sparse embedding sums only where they go straight
        # into a fused noise buffer.
        bounds = settings.bounds(params)
        self._bounded = frozenset(bounds) if isinstance(bounds, dict) else frozenset()
        self._clipped = ClippedSum(bounds, sparse_sums=ranks is None and self.noise.fuses_sums,
                                   gamma=settings.gamma, shard=getattr(ranks, "shard_sums", None))
        self.adaptive_clipping = None if settings.clipping not in ADAPTIVE else QuantileBound(
            tuple(bounds.values()) if isinstance(bounds, dict) else bounds,
            settings.target_quantile, settings.quantile_lr, settings.count_noise_std)
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
        self._handles = [optimizer.register_step_pre_hook(eager(self._before_step)),
                         optimizer.register_step_post_hook(eager(self._after_step))]
        self._checking = True
        for p in params:  # the first private step overwrites them; the self-check needs None
            p.grad = None
        attachment.attach(self, module, optimizer)
        # Seeds follow torch.manual_seed; the noise has its own generator (privatize.noise)
        seed, noise_seed = (int(s) for s in torch.randint(0, 2**62, (2,), dtype=torch.int64))
        self.noise = self.noise.seeded(noise_seed if ranks is None else ranks.noise_seed(noise_seed))
        self.mechanism = mechanism
        self._mechanism_run = (mechanism_run.MechanismRun(mechanism, steps, params, self.noise)
                               if correlated else None)
        if poisson_sampling:
            group_key = mechanism_run.group_key(self.secure_mode, seed, sampling)
            if ranks is not None:  # one global sample per step, one partition, for the job
                seed, group_key = ranks.broadcast_seed(seed), ranks.broadcast_seed(group_key)
            self._sampler, drawn, data_loader = sampling.loader(
                data_loader, seed=seed, secure=self.secure_mode, ranks=ranks, group_key=group_key)
            self._sampler_seed = None if self.secure_mode else seed
            self._rows.drawn = drawn
        return module, optimizer, data_loader

    def make_private_with_epsilon(
        self, *, module, optimizer, data_loader, target_epsilon: float, target_delta: float,
        max_grad_norm, epochs: int | None = None, steps: int | None = None, **kwargs,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Like [`make_private()`][privgrad.PrivacyEngine.make_private], with the smallest noise
        that keeps the total epsilon (with ``release_sum``'s) at or below ``target_epsilon``
        after ``epochs`` epochs, or ``steps`` steps (give exactly one; per the accountant)."""
        _settings.refuse_unknown({k: v for k, v in kwargs.items() if k not in _MAKE_PRIVATE},
                                 "make_private_with_epsilon")
        mechanism, sampling, n = planned = units.refine(mechanism_run.plan(data_loader, kwargs.pop(
            "mechanism", None), steps, epochs, required=True, **kwargs), data_loader, epochs,
            group_key=partial(mechanism_run.group_key, self.secure_mode), **kwargs)
        budget = dict(target_epsilon=target_epsilon, target_delta=target_delta,  # the total:
                      accountant=self.accountant.name, prior=self.accountant.event)  # + spent
        if mechanism_run.correlated(mechanism):
            sigma = mechanism_run.calibrate(mechanism, sampling, n, **budget)
        else:
            sigma = _settings.calibrate(sampling, epochs=epochs, steps=steps, **budget)
        defaults = dict(clipping="flat", grad_sample_mode="auto", check="first_step")
        return self._attach(module, optimizer, data_loader, planned, noise_multiplier=sigma,
                            max_grad_norm=max_grad_norm, **{**defaults, **kwargs})

    @property
    def module(self) -> nn.Module | None:
        """The model this engine privatises (``None`` before ``make_private``/after ``detach``)."""
        return self._module

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer this engine privatises (``None`` before ``make_private``/after ``detach``)."""
        return self._optimizer

    @property
    def clipping_bound(self) -> float | None:
        """``C`` now: the bound the next step clips at (adaptive clipping: the moving bound;
        per-layer: the root-sum-of-squares of the bounds). ``None`` before ``make_private``."""
        if self.adaptive_clipping is not None:
            return self.adaptive_clipping.total
        return None if self.settings is None else self.settings.total_bound

    @property
    def data_parallel(self) -> bool:
        """Whether ``make_private`` attached this engine to a ``torch.distributed`` job."""
        return self._distributed is not None

    # -- the budget ------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before the first step)."""
        delta = _validate.open_unit("delta", delta, "Pass a delta well below 1/N, e.g. 1e-5.")
        if self._sampling is not None and self._sampling.units is not None:
            _settings.warn_large_delta(delta, self._sampling.units, "delta")
        return self.accountant.get_epsilon(delta=delta)

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
        attachment.forget(self._module, self._optimizer)
        self._module = self._optimizer = self._recorder = self._guard = None
