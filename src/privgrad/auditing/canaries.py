"""White-box gradient canaries that go through privgrad's real sampler, clipping and noise.

Each of the ``m`` canaries owns one coordinate: row ``i`` of a dedicated ``nn.Embedding(m, 1)``
(the *canary head*), which no other record touches. A canary is a virtual record: an index in
the training data set after the user's own records, sampled by the real Poisson loader like any
record. In the batch it takes one row, which the user's model sees as a *filler* input (a copy of
the data set's first record) whose loss is masked to zero, and which the head sees as the canary's
id. [`GradientCanaries.loss()`][privgrad.auditing.canaries.GradientCanaries.loss] combines the
user's per-example losses with the canaries' term ``magnitude * head(id)`` into the one loss of the
step, so canary ``i``'s per-sample gradient is a huge multiple of its own basis vector and zero
everywhere else, and flat clipping scales it to exactly ``C``. After the engine has written the
noisy gradient, a step pre-hook reads the head's gradient, the released value of every canary
coordinate at every step, and the canary ids the step's batch held.

A canary is included in the training set with probability 1/2, independently, from the
canaries' own seed. Excluded canaries are never in the data set, so their coordinates show the
pure noise of every step.

    canaries = GradientCanaries(num_canaries=1000, seed=1)
    module = canaries.module_with(model)           # the model plus the canary head
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    data = canaries.dataset(train_set)             # the user's records, then the included canaries
    loader = DataLoader(data, batch_size=256, collate_fn=data.collate)
    module, optimizer, loader = engine.make_private(module=module, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    canaries.watch(engine, optimizer)
    for records, canary_ids in loader:
        optimizer.zero_grad()
        x, y = records                             # the user's rows, then one filler per canary
        losses = F.cross_entropy(module(x), y, reduction="none")
        canaries.loss(losses, canary_ids).backward()
        optimizer.step()
    print(canaries.report(engine, delta=1e-5).text())

Privacy:
    The canaries audit the mechanism privgrad runs on the model's parameters: one flat-clipped,
    Poisson-sampled Gaussian release per step. They need flat clipping (a per-layer bound would
    clip the canary to its own share of ``C``). A filler row adds exactly zero to the update: its
    loss is masked, so its per-sample gradient is zero on every parameter.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from privgrad import _validate
from privgrad.auditing.report import AuditReport, Observations, evaluate
from privgrad.auditing.simulation import AuditSettings
from privgrad.errors import ConfigError, PrivacyStateError
from privgrad.sampling.loader import empty_like_batch

__all__ = ["CanaryBatch", "CanaryDataset", "GradientCanaries", "ModelWithCanaries"]

CanaryBatch = namedtuple("CanaryBatch", ["records", "canary_ids"])
CanaryBatch.__doc__ = (
    "A batch of a ``CanaryDataset``: the user's collated records (their own rows, then one "
    "filler row per canary) and the ``(B,)`` long tensor of canary ids, -1 on the user's rows.")


@dataclass(frozen=True)
class _Canary:
    index: int


class CanaryDataset(Dataset):
    """The user's records followed by the included canaries (virtual records).

    Args:
        records: the user's map-style data set (at least one record, the filler).
        canary_ids: ids of the included canaries, one record each.
        collate_fn: how to collate the user's records (default: PyTorch's ``default_collate``).
        filler: what the user's model sees on a canary's row (default: ``records[0]``); its loss
            is masked, so its value does not matter as long as the model computes a finite loss.
    """

    def __init__(self, records, canary_ids: np.ndarray, collate_fn=None, filler=None):
        self.records = records
        self.canary_ids = np.asarray(canary_ids, dtype=np.int64)
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self._num_records = len(records)
        if filler is None and self._num_records == 0:
            raise _validate.fail(
                "the canaries need a filler record for the model", "len(records)", 0,
                "Pass at least one record, or filler=an example input of your model.")
        self.filler = filler if filler is not None else records[0]

    def __len__(self) -> int:
        return self._num_records + len(self.canary_ids)

    def __getitem__(self, index: int):
        if index < self._num_records:
            return self.records[index]
        return _Canary(int(self.canary_ids[index - self._num_records]))

    def collate(self, items: list) -> CanaryBatch:
        """Collate items into a ``CanaryBatch``: the user's records first, then a filler row
        per canary (use as the loader's ``collate_fn``)."""
        real = [x for x in items if not isinstance(x, _Canary)]
        ids = [x.index for x in items if isinstance(x, _Canary)]
        rows = real + [self.filler] * len(ids)
        records = (self.collate_fn(rows) if rows
                   else empty_like_batch(self.collate_fn([self.filler])))
        canary_ids = torch.tensor([-1] * len(real) + ids, dtype=torch.long)
        return CanaryBatch(records, canary_ids)


class ModelWithCanaries(nn.Module):
    """The user's model and the canary head in one module; ``forward`` is the model's own.

    Pass it to ``make_private`` so that the head is hooked and privatised with the model; the
    user's model object is untouched (its own ``state_dict`` keeps its keys).
    """

    def __init__(self, model: nn.Module, head: nn.Embedding):
        super().__init__()
        self.model = model
        self.canaries = head

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class GradientCanaries:
    """``m`` white-box gradient canaries, each in the training set with probability 1/2.

    Args:
        num_canaries: ``m`` (1,000 to 5,000 is typical).
        seed: seed of the inclusion draws (an int, a ``numpy.random.SeedSequence`` or ``None``
            for fresh entropy). Use a different seed (or a spawned child) for anything else.
        magnitude: size of a canary's gradient before clipping; must exceed ``1000 * C``.

    Attributes:
        included: ``(m,)`` bool, whether each canary is in the training set.
        head: the ``nn.Embedding(m, 1)`` whose row ``i`` is canary ``i``'s coordinate.
    """

    def __init__(self, num_canaries: int, *, seed=None, magnitude: float = 1e6):
        m = _validate.positive_int("num_canaries", num_canaries, "Pass e.g. 1000.")
        self.magnitude = _validate.positive("magnitude", magnitude, "Pass e.g. 1e6.")
        self.included = np.random.default_rng(seed).random(m) < 0.5
        self.head = nn.Embedding(m, 1)
        nn.init.zeros_(self.head.weight)
        self._released: list[np.ndarray] = []
        self._sampled: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []
        self._handle = None
        self._normaliser = 1.0
        self._reduction: str | None = None

    @property
    def num_canaries(self) -> int:
        return int(self.included.shape[0])

    # -- building the run ------------------------------------------------------------------
    def module_with(self, model: nn.Module) -> ModelWithCanaries:
        """``model`` plus the canary head; pass it to ``make_private`` and build the optimizer
        from its parameters."""
        if not isinstance(model, nn.Module):
            raise _validate.fail("model must be a torch.nn.Module", "model", type(model).__name__,
                                 "Pass your model.")
        return ModelWithCanaries(model, self.head)

    def dataset(self, records, collate_fn=None, filler=None) -> CanaryDataset:
        """The user's ``records`` followed by the included canaries; build the loader with
        ``collate_fn=dataset.collate`` (``collate_fn`` here collates the user's records; see
        ``CanaryDataset`` for ``filler``)."""
        return CanaryDataset(records, np.flatnonzero(self.included), collate_fn, filler)

    def watch(self, engine, optimizer: torch.optim.Optimizer) -> None:
        """Start recording what each step releases on the canary coordinates.

        Call it after ``engine.make_private`` and before the first step.

        Raises:
            PrivacyStateError: ``make_private`` was not called yet, or steps already ran.
            ConfigError: per-layer clipping, ``max_grad_norm`` too large for ``magnitude``, an
                optimizer without the canary head, or a data-parallel engine.
        """
        settings = getattr(engine, "settings", None)
        if settings is None:
            raise PrivacyStateError(
                "canaries.watch needs an engine after make_private; got engine.settings=None. "
                "Call engine.make_private(...) first, then canaries.watch(engine, optimizer).")
        if self._handle is not None or engine.steps:
            raise PrivacyStateError(
                f"canaries.watch must be called once, before the first step; got "
                f"engine.steps={engine.steps}. Create new canaries for a new run.")
        if engine.data_parallel:
            raise ConfigError(
                "the canary audit runs in one process; got an engine attached to a "
                "torch.distributed job (each process would see only its own canaries, and the "
                "audit would report a false violation). Audit the same settings in a single "
                "process: the job releases what one process would (docs/distributed.md).")
        if settings.clipping != "flat":
            raise _validate.fail("the canary audit needs flat clipping", "clipping",
                                 settings.clipping, "Audit a run with clipping='flat'.")
        if settings.total_bound * 1e3 > self.magnitude:
            raise _validate.fail(
                f"max_grad_norm must be below magnitude / 1000 = {self.magnitude / 1e3:g} so that "
                f"every canary is clipped", "max_grad_norm", settings.total_bound,
                "Pass a larger magnitude to GradientCanaries.")
        if engine.optimizer is not optimizer:
            raise ConfigError("canaries.watch needs the optimizer passed to make_private; got "
                              "another optimizer. Pass the same optimizer object.")
        weight = self.head.weight
        if not weight.requires_grad or not any(
                p is weight for g in optimizer.param_groups for p in g["params"]):
            raise ConfigError(
                f"the optimizer must update the canary head; got head.weight.requires_grad="
                f"{weight.requires_grad} or an optimizer without it. Leave the head trainable and "
                f"build the optimizer from canaries.module_with(model).parameters().")
        self._normaliser = float(settings.normaliser)
        self._reduction = settings.loss_reduction
        # Registered after make_private, so it runs after the engine wrote the noisy gradient.
        self._handle = optimizer.register_step_pre_hook(self._record)

    def detach(self) -> None:
        """Stop recording (the observations so far are kept)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- during training -------------------------------------------------------------------
    def loss(self, losses: torch.Tensor, canary_ids: torch.Tensor) -> torch.Tensor:
        """The step's one loss: the user's per-example ``losses`` on their own rows, the canaries'
        term on theirs, reduced as the engine's ``loss_reduction`` says (mean over all ``B`` rows,
        or sum).

        Args:
            losses: ``(B,)`` per-example losses of the batch (``reduction="none"``); the values
                on canary rows (the filler's) are masked out.
            canary_ids: the batch's ``canary_ids`` (``-1`` on the user's rows).

        Raises:
            PrivacyStateError: before
                [`watch()`][privgrad.auditing.canaries.GradientCanaries.watch], or a canary entering
                the same step twice.
        """
        if self._reduction is None:
            raise PrivacyStateError(
                "canaries.loss needs canaries.watch(engine, optimizer) first; got no watched "
                "engine. Call watch after make_private and before the first step.")
        ids = torch.as_tensor(canary_ids, dtype=torch.long).reshape(-1)
        if losses.shape != ids.shape:
            raise _validate.fail("losses must have one value per row of the batch", "losses.shape",
                                 tuple(losses.shape), f"Pass reduction='none' losses of shape "
                                 f"{tuple(ids.shape)}.")
        is_canary = ids >= 0
        taken = ids[is_canary].cpu().numpy()
        seen = np.concatenate([*self._pending, taken])
        if np.unique(seen).size != seen.size:
            raise PrivacyStateError(
                "each canary may enter a step at most once; got a canary twice before one "
                "optimizer.step(). Call canaries.loss once per batch (per chunk with virtual "
                "batches) on the loader's own canary_ids.")
        device = self.head.weight.device
        is_canary = is_canary.to(device)
        out = self.head(ids.clamp(min=0).to(device)).reshape(-1) * self.magnitude
        zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
        per_row = torch.where(is_canary.to(losses.device), zero, losses) + torch.where(
            is_canary, out, torch.zeros((), dtype=out.dtype, device=device)).to(losses.device)
        self._pending.append(taken)
        if self._reduction == "sum":
            return per_row.sum()
        return per_row.sum() / max(1, per_row.numel())

    def _record(self, optimizer, args, kwargs) -> None:
        grad = self.head.weight.grad
        if grad is None:  # an earlier chunk of a virtual batch: nothing released yet
            return
        released = grad.detach().reshape(-1).to(torch.float64).cpu().numpy() * self._normaliser
        sampled = np.zeros(self.num_canaries, dtype=bool)
        for ids in self._pending:
            sampled[ids] = True
        self._pending = []
        self._released.append(released.astype(np.float32))
        self._sampled.append(sampled)

    # -- after training --------------------------------------------------------------------
    def observations(self) -> Observations:
        """What the canaries recorded: inclusion, released values and sampled ids per step."""
        if not self._released:
            raise PrivacyStateError(
                "the canaries recorded no step; got 0 releases. Call canaries.watch(engine, "
                "optimizer) after make_private and train at least one step.")
        return Observations(self.included.copy(), np.stack(self._released),
                            np.stack(self._sampled))

    def report(self, engine, *, delta: float, confidence: float = 0.95, guesses=None,
               simulations: int = 2000, band_coverage: float = 0.998, alpha: float = 1e-3,
               seed=None) -> AuditReport:
        """Audit the run so far; see ``privgrad.auditing.evaluate()`` for the arguments.

        Privacy:
            ``seed`` drives the simulations only; it must not be the canaries' own seed (pass
            ``None`` or an independent seed), or the guess counts would depend on the inclusion
            bits.
        """
        obs = self.observations()
        if obs.steps != engine.steps:
            raise PrivacyStateError(
                f"the canaries must see every step of the run; got {obs.steps} recorded of "
                f"engine.steps={engine.steps}. Call canaries.watch before the first step.")
        s = engine.settings
        settings = AuditSettings(self.num_canaries, s.sample_rate, s.noise_multiplier,
                                 s.total_bound, obs.steps, delta, confidence)
        return evaluate(obs, settings, engine.get_epsilon(delta), guesses=guesses,
                        simulations=simulations, band_coverage=band_coverage, alpha=alpha,
                        seed=seed)
