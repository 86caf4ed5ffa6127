"""Only the private step moves the model: a guard on every parameter and buffer.

DP-SGD releases the model through the noisy gradient alone. A forward pass that writes model
state in place (an embedding renormalised by ``max_norm``, BatchNorm's running statistics, the EMA
buffer of a custom module) releases a function of the private batch with no noise at all, and no
per-layer rule can see it. ``StateGuard`` catches the whole class at run time from PyTorch's
version counters: every in-place write to a tensor bumps its ``_version``. The guard reads the
counters of every parameter and buffer of the model when the outermost module call of a forward
pass starts (the root, or a submodule called directly), and again when it ends and when a
backward pass ends; any change means the forward or backward pass wrote model state.

Module types known to write in their forward (``writes_state``) are refused *before* the call,
so their write never happens. Anything else is caught just after the write: the guard then
refuses every further release (the model in memory now holds a value computed from private data
without noise, and must not be published).

Cost: one integer read per tensor at the start and end of each forward pass and at the end of
each backward pass, plus two small hooks per module that holds tensors.

Some native kernels write without bumping the counter (BatchNorm's running statistics inside
``F.batch_norm``, fused fake-quantisation). While ``StateGuard.watch_values`` is set (the
engine sets it for the passes it self-checks: the first one, and every one with
``check="every_step"``), the guard also copies every buffer when the forward pass starts and
compares the values when it ends, so a module that writes its buffers in every training forward
is caught on the first step.

Privacy:
    Guarantees that no parameter or buffer registered on the model is modified in place by a
    forward or backward pass while the engine is attached, except by the optimizer's step (which
    applies the private gradient) and user code between steps (post-processing of released
    values). It cannot see state kept outside the model's registered tensors (a plain Python
    attribute, a global), nor a tensor replaced by assignment rather than written in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from privgrad.engine.compiled import eager
from privgrad.errors import ModelValidationError, PrivacyStateError

__all__ = ["StateGuard"]


class StateGuard:
    """Refuses forward and backward passes that write the model's parameters or buffers.

    Args:
        root: the model (its every registered parameter and buffer is watched).
        writes_state: ``module -> reason | None``: why the module's next call would write its own
            state (checked before each call of a module of a type that may), or ``None``.
        writer_types: the module types ``writes_state`` knows (others are not asked).
        on_forward: called when the outermost module call of a forward pass starts (after the
            versions are read); it may raise to refuse the pass.

    Attributes:
        violation: the message of the first write caught after the fact, or ``None``; while set,
            ``check_clean()`` raises it.
    """

    privgrad_hooks = True  # its hooks are privgrad's own (see engine.capture)

    def __init__(self, root: nn.Module, writes_state: Callable[[nn.Module], str | None],
                 writer_types: tuple[type, ...], on_forward: Callable[[], None] | None = None):
        self.root = root
        self.on_forward = on_forward
        self.writes_state = writes_state
        self.writer_types = writer_types
        self.paths = {m: name for name, m in root.named_modules(remove_duplicate=False)}
        self.violation: str | None = None
        self._tensors: list[tuple[str, torch.Tensor]] = []
        self._calls: list[nn.Module] = []  # module calls under way, outermost first
        self._at_start: list[int] | None = None
        self._after_forward: list[int] | None = None
        self._handles: list = []
        self.watch_values = False
        self._buffers: list[tuple[str, torch.Tensor]] = []
        self._values: list[torch.Tensor] | None = None

    # -- wiring ------------------------------------------------------------------------------
    def attach(self) -> None:
        """Hook every module whose subtree holds a parameter or buffer."""
        self._buffers = list(self.root.named_buffers())
        self._tensors = [*self.root.named_parameters(), *self._buffers]
        for m in self.paths:
            if next(m.parameters(), None) is None and next(m.buffers(), None) is None:
                continue
            # _enter first: a pre-hook that raises still gets _leave (always_call)
            self._handles.append(m.register_forward_pre_hook(eager(self._enter)))
            if isinstance(m, self.writer_types):
                self._handles.append(m.register_forward_pre_hook(eager(self._refuse_writer)))
            self._handles.append(m.register_forward_hook(eager(self._leave), always_call=True))
        self._after_forward = self._versions()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _versions(self) -> list[int]:
        return [t._version for _, t in self._tensors]

    # -- hooks -------------------------------------------------------------------------------
    def _refuse_writer(self, module: nn.Module, args) -> None:
        reason = self.writes_state(module)
        if reason is not None:
            path = self.paths.get(module, type(module).__name__) or "<root>"
            raise ModelValidationError(
                f"a forward pass must not write model state in place while privgrad is "
                f"attached; got module {path} ({type(module).__name__}) about to {reason}. That "
                f"write would be a function of the private batch with no noise, kept in the "
                f"model. Nothing was written.")

    def _enter(self, module: nn.Module, args) -> None:
        outermost = not self._calls
        if outermost:
            self._at_start = self._versions()
        self._calls.append(module)
        if outermost and self.on_forward is not None:
            self.on_forward()
        if outermost:
            self._values = ([t.detach().clone() for _, t in self._buffers] if self.watch_values
                            else None)

    def _leave(self, module: nn.Module, args, output) -> None:
        if not self._calls or self._calls[-1] is not module:
            return  # an earlier pre-hook raised before _enter ran
        self._calls.pop()
        if not self._calls and self._at_start is not None:
            now = self._versions()
            if now != self._at_start:
                self._compare(self._at_start, now, lambda: f"the forward pass of module "
                                                           f"{self._path(module)}")
            if self._values is not None:
                values, self._values = self._values, None
                written = [name for (name, t), v in zip(self._buffers, values)
                           if not _same(t, v)]
                if written:
                    self._refuse(written, f"the forward pass of module {self._path(module)}")
            self._after_forward = now

    def after_backward(self) -> None:
        """Called when a backward pass ends: it must not have written model state either."""
        if self._after_forward is not None:
            now = self._versions()
            if now != self._after_forward:
                self._compare(self._after_forward, now, lambda: "the backward pass (or code "
                              "between the forward and the end of the backward pass)")
            self._after_forward = now

    def after_step(self) -> None:
        """Called after the private step: its writes (the optimizer's) are the allowed ones."""
        self._after_forward = self._versions()

    def _path(self, module: nn.Module) -> str:
        return self.paths.get(module, type(module).__name__) or "<root>"

    # -- checks ------------------------------------------------------------------------------
    def _compare(self, before: list[int], now: list[int], during) -> None:
        """Raise for the tensors whose versions moved (``during()``: where, for the message)."""
        if len(now) != len(before):
            return
        written = [name for (name, _), a, b in zip(self._tensors, before, now) if a != b]
        if written:
            self._refuse(written, during())

    def _refuse(self, written: list[str], during: str) -> None:
        listed = ", ".join(written[:8]) + (f" and {len(written) - 8} more" if len(written) > 8
                                           else "")
        self.violation = (
            f"only the private step may change the model while privgrad is attached; got "
            f"{listed} written in place during {during}. The new values are a function of the "
            f"private batch with no noise: the model in memory must not be saved or published, "
            f"and this engine releases nothing more. Fix: make the module compute without "
            f"writing its parameters or buffers (eval mode for running statistics, max_norm=None "
            f"for embeddings), or move a data-independent update (a projection of the weights) "
            f"after optimizer.step(); then reload the last checkpoint into a new PrivacyEngine.")
        raise PrivacyStateError(self.violation)

    def check_clean(self) -> None:
        """Raise the first violation again, if any (before any release or state export)."""
        if self.violation is not None:
            raise PrivacyStateError(self.violation)


def _same(now: torch.Tensor, before: torch.Tensor) -> bool:
    """Equal shapes and values (NaN equal to NaN)."""
    if now.shape != before.shape or now.dtype != before.dtype:
        return False
    if torch.equal(now, before):
        return True
    return bool(now.is_floating_point() and ((now == before) | (now.isnan() & before.isnan())).all())
