"""Hugging Face ``Trainer``: private fine-tuning by swapping ``Trainer`` for ``DPTrainer``.

>>> from privgrad.integrations.huggingface import DPTrainer    # pip install -e ".[hf]"
>>> trainer = DPTrainer(model=model, args=training_args, train_dataset=train_set,
...                     target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)  # doctest: +SKIP
>>> trainer.train()                                                              # doctest: +SKIP

When training starts, ``DPTrainer`` builds the optimizer (``Trainer.create_optimizer``, or the
one passed in ``optimizers``), calls
[`PrivacyEngine.make_private()`][privgrad.PrivacyEngine.make_private] on the model, that optimizer
and a loader over ``train_dataset`` with ``per_device_train_batch_size``, and trains on the returned
Poisson loader. Every log line carries ``epsilon``, and the ``grad_norm`` the ``Trainer`` logs is
the norm of the gradient the private step released (the ``Trainer`` measures ``p.grad`` before
``optimizer.step()``, which is before privgrad writes the private gradient there); with
``max_epsilon`` training stops cleanly before the step that would exceed it. Checkpoints carry the
engine's state, and ``train(resume_from_checkpoint=...)`` continues it (never a replay of the first
run).
"""

from __future__ import annotations

import math
import os
from typing import Any

from privgrad._install import install_hint

try:
    import torch
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "privgrad.integrations.huggingface needs transformers; got no module "
        f"{e.name!r}. Install it: {install_hint('hf')}.") from e

from torch.utils.data import DataLoader

from privgrad import _validate
from privgrad.errors import ConfigError
from privgrad.monitoring import BudgetStop
from privgrad.privacy_engine import PrivacyEngine
from privgrad.sampling import steps_per_epoch

__all__ = ["DPTrainer", "ENGINE_STATE"]

#: The engine's state in a checkpoint folder (``engine.state_dict()``, ``torch.save``d).
ENGINE_STATE = "privgrad_engine.pt"


class _BudgetCallback(TrainerCallback):
    """Asks the trainer to stop once the next step would exceed the budget."""

    def __init__(self, trainer: DPTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        budget = self.trainer.budget
        if budget is not None and budget.exhausted:
            control.should_training_stop = True
        return control


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` whose training is DP-SGD with per-example privacy.

    Takes every ``Trainer`` argument, plus (keyword only) exactly one of ``noise_multiplier`` or
    ``target_epsilon``.

    Args:
        max_grad_norm: C, the per-example clipping bound (``TrainingArguments.max_grad_norm``
            clips the *batch* gradient and does not matter here).
        noise_multiplier: sigma.
        target_epsilon: the epsilon to reach at ``target_delta`` after the steps the trainer
            will take: ``TrainingArguments.max_steps`` when set (> 0, as the ``Trainer`` itself
            reads it), else ``num_train_epochs`` epochs; or after ``steps``/``epochs``.
        target_delta: the delta epsilon is reported and calibrated at.
        epochs: epochs for calibration (at most one of ``epochs`` and ``steps``); training may
            not be planned longer than this.
        steps: optimizer steps for calibration; training may not be planned longer.
        max_epsilon: stop before the first step that would exceed it.
        accountant: ``"pld"`` (default) or ``"rdp"``.
        **kwargs: the ``Trainer``'s own arguments; ``privacy_kwargs`` (a dict) passes more
            [`PrivacyEngine.make_private()`][privgrad.PrivacyEngine.make_private] arguments
            (``grad_sample_mode``, ...).

    Attributes:
        engine: the [`PrivacyEngine`][privgrad.PrivacyEngine]; ``engine.get_epsilon(delta)`` at any
            time.

    Privacy:
        Per *example* of ``train_dataset`` (a sequence, not a token): each example's gradient is
        clipped as a whole, under Poisson sampling with rate ``batch_size / len(train_dataset)``.
        It assumes the loss is a mean over examples (true for sequence classification); a
        token-level loss averaged over all tokens of the batch makes each example's gradient
        depend on the others' lengths, which the guarantee does not cover. Gradient accumulation
        (``gradient_accumulation_steps > 1``) and multi-process training are refused. The logged
        loss is not a private release; the logged ``grad_norm`` is (the norm of the last step's
        noisy gradient, as the optimizer received it: post-processing, covered by the guarantee). A resumed run continues the sampler and the noise from
        the checkpoint's engine state; a checkpoint without one is refused.
    """

    def __init__(self, *args, max_grad_norm: float, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, target_delta: float = 1e-5,
                 epochs: float | None = None, steps: int | None = None,
                 max_epsilon: float | None = None,
                 accountant: str = "pld", privacy_kwargs: dict[str, Any] | None = None,
                 **kwargs):
        if (noise_multiplier is None) == (target_epsilon is None):
            raise _validate.fail(
                "exactly one of noise_multiplier and target_epsilon must be given",
                "(noise_multiplier, target_epsilon)", (noise_multiplier, target_epsilon),
                "Pass noise_multiplier=1.0, or target_epsilon=3.0 to calibrate the noise.")
        if epochs is not None and steps is not None:
            raise _validate.fail("at most one of epochs and steps may be given",
                                 "(epochs, steps)", (epochs, steps),
                                 "Pass epochs=... or steps=... (or neither, to calibrate for "
                                 "max_steps / num_train_epochs).")
        super().__init__(*args, **kwargs)
        self.privacy = dict(max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                            target_epsilon=target_epsilon, epochs=epochs, steps=steps,
                            **(privacy_kwargs or {}))
        self.delta = _validate.open_unit("target_delta", target_delta,
                                         "Pass a delta well below 1/N, e.g. 1e-5.")
        self.max_epsilon = max_epsilon
        self.engine = PrivacyEngine(accountant=accountant)
        self.budget: BudgetStop | None = None
        self._private_loader: DataLoader | None = None
        self._resume_state: str | None = None
        self._released_norm: torch.Tensor | None = None  # of the last private step's gradient
        self._norm_hook = None
        self.add_callback(_BudgetCallback(self))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``. Resuming (``resume_from_checkpoint``: a checkpoint folder, or
        ``True`` for the last one in ``output_dir``) continues the engine's state saved with the
        checkpoint (``ENGINE_STATE``: accountant, sampler position, noise generators), so
        no batch and no noise of the first run repeats; a checkpoint without it is refused."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if folder not in (None, False):
            state = os.path.join(folder, ENGINE_STATE)
            if not os.path.isfile(state):
                raise _validate.fail(
                    f"a checkpoint to resume from must hold privgrad's engine state "
                    f"({ENGINE_STATE}: the accountant, the sampler's position and the noise "
                    f"generators; without it epsilon would restart at 0 and the first run's "
                    f"batches and noise would repeat)", "resume_from_checkpoint",
                    resume_from_checkpoint,
                    "Resume from a checkpoint a DPTrainer saved, or start a new run with the "
                    "budget that is left.")
            self._resume_state = state
        return super().train(folder, *args, **kwargs)

    def _load_callback_state(self) -> None:
        """(Called by ``Trainer`` when it resumes, after the private loader exists.)"""
        super()._load_callback_state()
        if self._resume_state is not None:
            self.engine.load_state_dict(torch.load(self._resume_state, weights_only=True))

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        """The private loader as it is: its sampler continues from the saved position, so
        skipping batches would skip Poisson samples (the ``Trainer``'s default re-wraps it)."""
        return dataloader

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer``'s checkpoint, plus the engine's state beside it (``ENGINE_STATE``)."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            torch.save(self.engine.state_dict(), os.path.join(folder, ENGINE_STATE))

    def get_train_dataloader(self) -> DataLoader:
        """The Poisson loader of the private run (made, with the optimizer, on first call)."""
        if self._private_loader is None:
            self._make_private()
        return self._private_loader

    def _make_private(self) -> None:
        args = self.args
        if args.gradient_accumulation_steps != 1:
            raise _validate.fail(
                "gradient_accumulation_steps must be 1", "gradient_accumulation_steps",
                args.gradient_accumulation_steps, "Each accumulated batch would be a separate "
                "Poisson sample inside one accounted step: raise per_device_train_batch_size "
                "instead (privgrad's virtual batches keep memory down).")
        if args.world_size != 1:
            raise ConfigError(f"DPTrainer trains in one process; got world_size={args.world_size}. "
                              f"Run a single process.")
        if self.train_dataset is None:
            raise ConfigError("DPTrainer needs a train_dataset; got train_dataset=None. Pass the "
                              "training examples.")
        dataset, collate = self.train_dataset, self.data_collator
        try:
            import datasets  # only to drop the model's unused columns, as Trainer does
        except ImportError:
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        loader = DataLoader(dataset, batch_size=self._train_batch_size, collate_fn=collate,
                            num_workers=args.dataloader_num_workers,
                            pin_memory=args.dataloader_pin_memory)
        self.create_optimizer()  # the Trainer reuses self.optimizer afterwards
        p = dict(self.privacy)
        epochs, steps, target = p.pop("epochs"), p.pop("steps"), p.pop("target_epsilon")
        common = dict(module=self.model, optimizer=self.optimizer, data_loader=loader)
        if target is not None:
            p.pop("noise_multiplier")
            horizon = self._horizon(epochs, steps, loader)
            _, _, self._private_loader = self.engine.make_private_with_epsilon(
                target_epsilon=target, target_delta=self.delta, **horizon, **common, **p)
        else:  # a correlated mechanism plans its noise for the run's steps
            horizon = self._horizon(epochs, steps, loader) if p.get("mechanism") else {}
            _, _, self._private_loader = self.engine.make_private(**common, **horizon, **p)
        # Registered after the engine's hooks, so it runs once p.grad holds the released gradient.
        self._norm_hook = self.optimizer.register_step_post_hook(self._record_released_norm)
        if self.max_epsilon is not None:
            self.budget = BudgetStop(self.engine, self.max_epsilon, self.delta)
            self.budget.check()  # not even one step fits: say so before training starts

    def _horizon(self, epochs, steps, loader: DataLoader) -> dict:
        """What the noise is calibrated for, and a check that the trainer's plan fits in it."""
        args = self.args
        q = self.privacy.get("sample_rate") or loader.batch_size / len(loader.dataset)
        per_epoch = steps_per_epoch(q)
        planned = (args.max_steps if args.max_steps and args.max_steps > 0
                   else math.ceil(args.num_train_epochs * per_epoch))
        if steps is None and epochs is None:
            if args.max_steps and args.max_steps > 0:
                steps = args.max_steps
            else:
                epochs = args.num_train_epochs
        if steps is None:
            if epochs != int(epochs) or epochs < 1:
                raise _validate.fail("calibration needs a whole number of epochs", "epochs", epochs,
                                     "Pass DPTrainer(epochs=...) or steps=..., or a whole "
                                     "num_train_epochs, or max_steps.")
            horizon, budget_steps = {"epochs": int(epochs)}, int(epochs) * per_epoch
        else:
            steps = _validate.positive_int("steps", steps, "Pass the number of optimizer steps.")
            horizon, budget_steps = {"steps": steps}, steps
        if planned > budget_steps:
            raise _validate.fail(
                f"the trainer must not plan more steps than the noise is calibrated for "
                f"({budget_steps}); it would spend more than target_epsilon", "planned steps",
                planned, "Calibrate for the run (leave epochs/steps unset to use max_steps or "
                "num_train_epochs), or lower max_steps/num_train_epochs.")
        return horizon

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.budget is not None:
            self.budget.check()  # a hard stop, should the stop signal be missed
        return super().training_step(model, inputs, num_items_in_batch)

    def _record_released_norm(self, optimizer, args, kwargs) -> None:
        """(Optimizer step post-hook.) Keep the L2 norm of the gradient just released, as a
        tensor: read with ``.item()`` only when a line is logged, like the ``Trainer``'s own."""
        norms = [torch.linalg.vector_norm(p.grad.coalesce().values() if p.grad.is_sparse else p.grad)
                 for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if norms:
            device = norms[0].device
            self._released_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every log line also reports ``epsilon`` (at ``target_delta``); a ``grad_norm`` is
        replaced by the norm of the last private step's released gradient."""
        if self.engine.settings is not None:
            logs["epsilon"] = self.engine.get_epsilon(self.delta)
        if "grad_norm" in logs:  # the Trainer's: measured before the private step, not released
            if self._released_norm is None:
                del logs["grad_norm"]
            else:
                logs["grad_norm"] = self._released_norm.item()
        super().log(logs, start_time)

    def detach(self) -> None:
        """Remove privgrad's hooks from the model and optimizer."""
        if self._norm_hook is not None:
            self._norm_hook.remove()
            self._norm_hook = None
        self.engine.detach()

