"""What a private run does while it trains: the part of [`PrivacyEngine`][privgrad.PrivacyEngine]
that runs at each forward pass, at the end of each backward pass and at each optimizer step.

- **Forward start** (the outermost module call, from the state guard): the self-check is
  switched on for parameters it has not covered; per-layer clipping refuses a parameter that has
  no bound.
- **Backward end** (from the recorder): the guards run (state, rows against the drawn batch, the
  self-check on checked passes), then the clip factors and the clipped sums are formed, and the
  raw gradients are taken out of ``p.grad``.
- **Optimizer step** (a step pre-hook): the release: the clipped sums (added across processes in
  data-parallel training), the noise once (correlated noise: the row of the batch's sampler
  step, ``privgrad.mechanism_run``), the normaliser, written to ``p.grad``; the accountant
  records the sampling's event; adaptive clipping releases its count and moves the bound.
  Inside a virtual batch, every chunk but the last releases
  nothing.

Privacy:
    Every refusal happens before the noisy gradient is written or the accountant records
    anything: a refused step releases nothing and spends nothing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import cache, partial

import torch

from privgrad import _validate
from privgrad import settings as _settings
from privgrad.engine.amp import float32_captures
from privgrad.engine.batch import BackwardBatch, materialize_early
from privgrad.engine.compiled import eager
from privgrad.engine.groups import check_release, pass_units
from privgrad.engine.padding import real_rows
from privgrad.engine.selfcheck import check_sums
from privgrad.errors import PrivacyStateError
from privgrad.privatize import noisy_gradients
from privgrad.sampling.users import owners_of
from privgrad.sampling.virtual import VirtualBatches

__all__ = ["COUNT", "TrainingHooks"]

#: The key of adaptive clipping's count (examples within the bound, examples) among the sums.
COUNT = "adaptive clipping count"


class TrainingHooks:
    """The hooks of a private run (a base of [`PrivacyEngine`][privgrad.PrivacyEngine], whose state
    they use; see the module docstring)."""

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
        try:  # sharded (FSDP2): every rank runs as many chunks as the rank that needs most
            yield VirtualBatches(data_loader, size, self._set_release, self._abandon,
                                 owners=owners_of(self._rows.drawn),  # user-level: whole users
                                 chunks=self._distributed.chunks if self._sharded else None)
        finally:
            self._abandon()

    def _set_release(self, last_chunk: bool) -> None:
        self._release_now = last_chunk

    def _abandon(self) -> None:
        """The virtual batches ended: a logical batch left unfinished releases nothing."""
        self._release_now = True
        if self._clipped is not None and self._clipped.stats.backward_passes:
            self._clipped.reset()
            self._rows.discard()

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
        if self._sharded:  # FSDP2 reduce-scatters autograd's gradients for the self-check only
            self._distributed.keep_raw = self._checking

    def _refuse_unbounded(self, params) -> None:
        late = [p for p in params if p not in self._bounded] if self._bounded else []
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

    def _on_backward(self, captures, after_fsdp: bool = False) -> None:
        if self._sharded and not after_fsdp:  # after FSDP2's own end-of-backward callback:
            torch.autograd.Variable._execution_engine.queue_callback(eager(  # all resharded
                lambda: self._on_backward(captures, after_fsdp=True)))
            return
        self._guard.after_backward()
        if self._amp is not None and self._backward_since_step:
            self._amp.discard(self._clipped)  # GradScaler skipped the step: nothing released
            self._rows.discard()
            self._backward_since_step = False
        if self._backward_since_step:
            raise PrivacyStateError(
                "one backward pass per optimizer.step() is allowed; got a second backward pass "
                "before the step. A second pass on the same examples would clip them twice, and "
                "one on another batch would put two samples under one noise draw; either "
                "breaks the guarantee. Combine the losses into one before backward(), or split "
                "a large batch with engine.virtual_batches(...), which steps per chunk.")
        params = _settings.privatised(self._optimizer)
        if self._sharded:  # the calls recorded FSDP's gathered parameters: key by the shards
            captures = self._distributed.own(captures)
        try:
            self._backward_since_step = self._add_backward(captures, params)
        finally:
            for c in captures:  # the clipped sums are formed: a kept `loss` must not hold these
                c.release()
            # No raw gradient stays in p.grad: another optimizer stepped now would apply it.
            # Queued behind every callback of this backward pass: DDP's reducer copies its
            # buckets (the local gradient) back into p.grad in a callback of its own.
            torch.autograd.Variable._execution_engine.queue_callback(
                partial(_eager_hide(), self, params))

    def _hide_raw_gradients(self, params) -> None:
        if self._amp is not None:
            self._amp.hide_raw_gradients(params)
        else:
            for p in params:
                p.grad = None

    def _add_backward(self, captures, params) -> bool:
        """Check one backward pass and add its clipped sums; on a refusal nothing is added.
        ``False``: the pass ran on rows the loader did not draw; its sums are set aside (never
        released; discarded by the next pass on a drawn batch)."""
        self._refuse_unbounded(params)
        loss_scale = self._amp.loss_scale() if self._amp is not None else 1.0
        tags = {c.tag for c in captures}
        units = pass_units(self._rows, tags, captures) if self.settings.privacy_unit == "user" \
            else None
        batch = BackwardBatch(float32_captures(captures, loss_scale),  # AMP: float32, unscaled
                              mode=self.performance.grad_sample_mode,
                              scale_by_batch=self.settings.loss_reduction == "mean",
                              paths=self._recorder.paths, units=units)
        real = real_rows(self._rows, tags, captures) if self.settings.max_batch_size else None
        drawn = self._rows.add(tags, batch.rows)
        if drawn and None in ((units, 1)[self.settings.privacy_unit != "user"],
                              (real, 1)[not self.settings.max_batch_size]):
            self._rows.reset()  # (never happens with privgrad's loader: a guard, not a path)
            raise PrivacyStateError(
                "the engine must know whose rows a user-level pass clips, and which rows of a "
                "fixed-shape batch are padding; got a drawn batch without that record. Iterate "
                "the loader make_private returned. Nothing was released.")
        if self._checking and self._recorder.checking:
            check = self._distributed.check_sums if self._sharded else check_sums
            if check(batch, params, self._names(), loss_scale=loss_scale, loose=self._autocast):
                self._checked = self._checked | frozenset(params)
                self._checking = self.check == "every_step"
                self._recorder.checking = self._checking
        if not drawn:
            self._undrawn += batch.rows
            return False
        self._undrawn = 0  # a pass on a drawn batch: what was set aside is discarded
        adaptive = self.adaptive_clipping
        if adaptive is not None and self._clipped.stats.backward_passes == 0:
            # one bound per logical step (per-layer: in the order the bounds were made)
            now = adaptive.bound
            self._clipped.bounds = dict(zip(self._clipped.bounds, now)) if adaptive.per_layer else now
        if real is None:
            self._clipped.add(batch, set(params))
        else:  # fixed shapes: padding rows dropped (engine.padding)
            self._clipped.add(batch, set(params), real=real)
        return True

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
        if self._clipped.stats.backward_passes == 0 and self._undrawn:
            rows, self._undrawn = self._undrawn, 0
            raise PrivacyStateError(self._rows.undrawn(rows))
        if self._clipped.stats.backward_passes == 0:
            raise PrivacyStateError(
                "optimizer.step() must follow a backward pass through the model; got a step with "
                "no backward pass since the last one. It would release pure noise and spend "
                "budget for nothing. Call loss.backward() first (an empty Poisson batch too: "
                "run the model on it). Nothing was released.")
        _settings.check_ownership(self._module, optimizer)
        run = self._mechanism_run  # correlated noise (privgrad.mechanism_run), else None
        try:
            if run is not None:
                run.check_parameters(params, self._names())
            if self.settings.privacy_unit == "user":
                check_release(self._rows)
            number = self._rows.release(in_order=run is not None)
            row = run.row(self._rows.drawn.step_of(number)) if run is not None else None
        except PrivacyStateError:
            self._clipped.reset()  # refused: nothing released, nothing kept for the next step
            self._rows.reset()
            raise
        s, adaptive = self.settings, self.adaptive_clipping
        # Data-parallel: reduce_sums adds the ranks' clipped sums up on rank 0, which alone draws
        # the noise, on that total, as one process would; every rank then gets rank 0's release.
        sums = self._clipped.sums
        used = self._clipped.bounds  # the bound(s) this step's sums were clipped at
        if adaptive is not None:  # adaptive clipping's counts travel with the sums
            stats = self._clipped.stats
            within = ([stats.within_by_param.get(p, stats.examples - stats.dropped) for p in used]
                      if adaptive.per_layer else [stats.within])
            sums = {**sums, COUNT: torch.tensor([*within, stats.examples], dtype=torch.float64,
                                                device=params[0].device)}
            used = tuple(used.values()) if adaptive.per_layer else used
        sums = self.reduce_sums(sums)
        std, normaliser = s.noise_std, self.normaliser()
        if adaptive is not None:  # per-layer bounds compose to their root-sum-of-squares
            bound = math.hypot(*used) if adaptive.per_layer else used
            # In units of the bound (post-processing by a public number): the gradient's scale
            # stays that of flat clipping at C = 1 while the bound moves, so SGD's step and
            # Adam's second moment do not follow it (docs/clipping.md, measured).
            std, normaliser = s.gradient_noise_multiplier * bound, normaliser * bound
        noise_std = std if self._distributed is None else self._distributed.noise_share(std)
        if run is not None:
            grads = run.release(sums, row=row, noise_std=noise_std, normaliser=normaliser)
        else:  # sharded (FSDP2): each rank noises its own shards (privgrad.distributed.fsdp)
            release = self._distributed.release if self._sharded else noisy_gradients
            grads = release(params, sums, noise_std=noise_std, normaliser=normaliser,
                            noise=self.noise)
        if adaptive is not None:  # drawn where the gradient's noise is: once, after it
            grads[COUNT] = (adaptive.release(sums[COUNT][:-1], sums[COUNT][-1], self.noise)
                            if COUNT in sums else torch.zeros(
                                adaptive.counts, dtype=torch.float64, device=params[0].device))
        if self._distributed is not None:
            grads = self._distributed.broadcast_release(grads)
        for p in params:
            p.grad = grads[p]
        if adaptive is not None:
            adaptive.update(grads[COUNT], s.expected_batch_size, used)
        if run is not None:  # once per round of the mechanism's reduction
            run.account(self.accountant, row, s.noise_multiplier, self._sampling)
        else:
            self.accountant.compose(self._sampling.event(s.noise_multiplier))
        self.steps += 1
        self.last_step_stats = self._clipped.stats
        self.dropped_examples += self.last_step_stats.dropped
        self._clipped.reset()
        return replaced

    @property
    def _sharded(self) -> bool:
        """Whether the model is sharded with FSDP2 (``privgrad.distributed.fsdp``)."""
        return getattr(self._distributed, "sharded", False)

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
        they receive rank 0's release instead (see ``privgrad.distributed``)."""
        if self._distributed is None:
            return sums
        return self._distributed.reduce_sums(sums, _settings.privatised(self._optimizer))


@cache
def _eager_hide():
    """``TrainingHooks._hide_raw_gradients`` wrapped by ``eager()`` once per process (wrapping
    it anew at every backward pass cost 6-150 us a step)."""
    return eager(TrainingHooks._hide_raw_gradients)


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
