"""PyTorch Lightning: make a ``LightningModule``'s training private with one callback.

>>> from privgrad.integrations.lightning import DPCallback      # pip install -e ".[lightning]"
>>> dp = DPCallback(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)   # doctest: +SKIP
>>> trainer = lightning.Trainer(max_epochs=10, callbacks=[dp])                  # doctest: +SKIP
>>> trainer.fit(model, train_dataloaders=loader)                                 # doctest: +SKIP

At the start of ``fit`` the callback calls
[`PrivacyEngine.make_private()`][privgrad.PrivacyEngine.make_private] on the ``LightningModule``,
the optimizer from ``configure_optimizers`` and the training loader, and gives the fit loop the
returned Poisson loader. Each step logs ``epsilon`` (shown in the progress bar) and
``clip_fraction``; the engine's whole state
([`PrivacyEngine.state_dict()`][privgrad.PrivacyEngine.state_dict]: accountant, sampler position,
noise generators) travels in Lightning checkpoints, so a resumed fit continues the batches and the
noise instead of replaying them; with ``max_epsilon`` the run stops cleanly before the step that
would exceed it.
"""

from __future__ import annotations

from typing import Any

from privgrad._install import install_hint

try:
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "privgrad.integrations.lightning needs PyTorch Lightning; got no module "
        f"{e.name!r}. Install it: {install_hint('lightning')}.") from e

from privgrad import _validate
from privgrad.errors import ConfigError, PrivacyStateError
from privgrad.monitoring import BudgetStop
from privgrad.privacy_engine import PrivacyEngine
from privgrad.sampling import steps_per_epoch

__all__ = ["DPCallback"]


class DPCallback(pl.Callback):
    """Trains the ``LightningModule`` with DP-SGD (single device, one optimizer).

    Give exactly one of ``noise_multiplier`` or ``target_epsilon``. With ``target_epsilon`` the
    noise is calibrated for ``steps`` optimizer steps or ``epochs`` epochs when given, else for
    the steps the trainer will take: ``max_steps`` when set, capped by ``max_epochs``.

    Args:
        max_grad_norm: C, the per-example clipping bound.
        noise_multiplier: sigma.
        target_epsilon: the epsilon to reach at ``target_delta`` after ``epochs`` epochs.
        target_delta: the delta epsilon is reported and calibrated at.
        epochs: epochs for calibration (at most one of ``epochs`` and ``steps``).
        steps: optimizer steps for calibration.
        max_epsilon: stop training before the first step that would exceed it.
        accountant: ``"pld"`` (default) or ``"rdp"``.
        secure_mode: passed to [`PrivacyEngine`][privgrad.PrivacyEngine].
        log_every_n_steps: how often epsilon is computed and logged (default: the trainer's).
        **make_private_kwargs: other
            [`PrivacyEngine.make_private()`][privgrad.PrivacyEngine.make_private] arguments
            (``clipping``, ``loss_reduction``, ``grad_sample_mode``, ...).

    Attributes:
        engine: the [`PrivacyEngine`][privgrad.PrivacyEngine] (after ``fit`` has started).

    Privacy:
        The guarantee is the engine's (see [`PrivacyEngine`][privgrad.PrivacyEngine]), per training
        example of the loader, under Poisson sampling. Lightning's gradient accumulation is
        refused (each accumulated batch would be a separate sample in one step); use a larger
        expected batch size instead. ``gradient_clip_val`` has no effect on privacy (privgrad's
        per-example clipping replaces the gradient). The logged ``clip_fraction`` and the loss
        are computed from private data without noise.
    """

    def __init__(self, *, max_grad_norm: float, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, target_delta: float = 1e-5,
                 epochs: int | None = None, steps: int | None = None,
                 max_epsilon: float | None = None,
                 accountant: str = "pld", secure_mode: bool = False,
                 log_every_n_steps: int | None = None, **make_private_kwargs: Any):
        if (noise_multiplier is None) == (target_epsilon is None):
            raise _validate.fail(
                "exactly one of noise_multiplier and target_epsilon must be given",
                "(noise_multiplier, target_epsilon)", (noise_multiplier, target_epsilon),
                "Pass noise_multiplier=1.0, or target_epsilon=3.0 to calibrate the noise.")
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.delta = _validate.open_unit("target_delta", target_delta,
                                         "Pass a delta well below 1/N, e.g. 1e-5.")
        if epochs is not None and steps is not None:
            raise _validate.fail("at most one of epochs and steps may be given",
                                 "(epochs, steps)", (epochs, steps),
                                 "Pass epochs=... or steps=... (or neither, to calibrate for "
                                 "the trainer's max_steps / max_epochs).")
        self.epochs = epochs
        self.steps = steps
        self.max_epsilon = max_epsilon
        self.log_every_n_steps = log_every_n_steps
        self.make_private_kwargs = make_private_kwargs
        self.engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        self.budget: BudgetStop | None = None
        self._restored: dict | None = None
        self._final: dict | None = None

    # -- setting up ------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine.settings is not None:
            raise PrivacyStateError(
                "a DPCallback makes one fit private; got a second fit() with the same callback. "
                "Create a new DPCallback (resume from a checkpoint to continue the budget).")
        _check_trainer(trainer, self.max_epsilon)
        optimizer = trainer.optimizers[0]
        loader = trainer.fit_loop._data_source.dataloader()
        common = dict(module=pl_module, optimizer=optimizer, data_loader=loader,
                      max_grad_norm=self.max_grad_norm, **self.make_private_kwargs)
        if self.target_epsilon is not None:
            _, _, private_loader = self.engine.make_private_with_epsilon(
                target_epsilon=self.target_epsilon, target_delta=self.delta,
                **self._horizon(trainer, loader), **common)
        else:
            horizon = (self._horizon(trainer, loader)  # a correlated mechanism plans its noise
                       if self.make_private_kwargs.get("mechanism") else {})
            _, _, private_loader = self.engine.make_private(
                noise_multiplier=self.noise_multiplier, **horizon, **common)
        # The fit loop asks this source for its loader after on_fit_start.
        trainer.fit_loop._data_source = _DataLoaderSource(private_loader, "train_dataloader")
        if self._restored is not None:  # resuming: continue the accountant, sampler and noise
            self.engine.load_state_dict(self._restored)
        if self.max_epsilon is not None:
            self.budget = BudgetStop(self.engine, self.max_epsilon, self.delta)
            self._stop_if_spent(trainer)

    def _horizon(self, trainer: pl.Trainer, loader) -> dict:
        """``{"steps": n}`` or ``{"epochs": n}``: what the noise is calibrated for."""
        if self.steps is not None:
            return {"steps": self.steps}
        if self.epochs is not None:
            return {"epochs": self.epochs}
        max_steps = trainer.max_steps if trainer.max_steps is not None else -1
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if max_steps > 0:
            if max_epochs > 0:  # whichever ends the fit first
                q = self.make_private_kwargs.get("sample_rate") or (
                    loader.batch_size / len(loader.dataset))
                return {"steps": min(max_steps, max_epochs * steps_per_epoch(q))}
            return {"steps": max_steps}
        if max_epochs > 0:
            return {"epochs": max_epochs}
        raise _validate.fail(
            "calibrating to target_epsilon needs the length of training", "(max_steps, "
            "max_epochs)", (max_steps, max_epochs),
            "Pass DPCallback(steps=...) or (epochs=...), or Trainer(max_steps=...) or "
            "(max_epochs=...).")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.budget is not None:  # a loop that ignored should_stop: refuse the next step
            self.budget.check()  # raises PrivacyBudgetError before this step is released

    # -- every step ------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        stats = self.engine.last_step_stats
        if stats is not None and stats.examples:
            pl_module.log("clip_fraction", stats.clipped / stats.examples, on_step=True,
                          on_epoch=False)
        if self.engine.steps % every == 0 or self.budget is not None:
            pl_module.log("epsilon", self.epsilon, on_step=True, on_epoch=False, prog_bar=True)
        self._stop_if_spent(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("epsilon", self.epsilon, on_step=False, on_epoch=True, prog_bar=True)

    def _stop_if_spent(self, trainer: pl.Trainer) -> None:
        if self.budget is not None and self.budget.exhausted:
            trainer.should_stop = True

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``target_delta``."""
        return self.engine.get_epsilon(self.delta) if self.engine.settings is not None else 0.0

    def on_fit_end(self, trainer, pl_module) -> None:
        self._final = self.engine.state_dict()  # a checkpoint saved after fit still has it
        self.engine.detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.engine.detach()

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The engine's [`state_dict()`][privgrad.PrivacyEngine.state_dict], saved in Lightning
        checkpoints (accountant, sampler seed and position, noise generators, counters)."""
        if self.engine.module is None:
            return self._final or self._restored or {}
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the engine's state when ``fit`` starts (after ``make_private``)."""
        if state_dict:
            if "format" not in state_dict:
                raise ConfigError(
                    "a DPCallback checkpoint must hold the engine's whole state (sampler and "
                    "noise generators, so that a resumed fit does not replay the first run's "
                    "batches and noise); got an older checkpoint with only the accountant. "
                    "Resume from a checkpoint written by this privgrad version, or start anew.")
            self._restored = dict(state_dict)


def _check_trainer(trainer: pl.Trainer, max_epsilon: float | None = None) -> None:
    if len(trainer.optimizers) != 1:
        raise ConfigError(
            f"DPCallback needs exactly one optimizer; got {len(trainer.optimizers)} from "
            f"configure_optimizers. Return one optimizer (it may hold several param groups).")
    if trainer.accumulate_grad_batches != 1:
        raise _validate.fail(
            "Lightning's accumulate_grad_batches must be 1", "accumulate_grad_batches",
            trainer.accumulate_grad_batches, "Each accumulated batch would be a separate Poisson "
            "sample inside one accounted step: use a larger batch_size in the DataLoader instead.")
    minimum = {"min_steps": trainer.fit_loop.min_steps, "min_epochs": trainer.fit_loop.min_epochs}
    if max_epsilon is not None and any(minimum.values()):
        name, value = next((k, v) for k, v in minimum.items() if v)
        raise _validate.fail(
            "a Trainer with max_epsilon must be free to stop when the budget is spent",
            f"Trainer({name})", value,
            f"Remove {name}: Lightning keeps training past should_stop until it is met, which "
            f"would spend more than max_epsilon.")
    if trainer.world_size != 1:
        raise _validate.fail(
            "DPCallback trains on one device", "trainer.world_size", trainer.world_size,
            "Use Trainer(devices=1), or privgrad's distributed support with a plain loop.")
