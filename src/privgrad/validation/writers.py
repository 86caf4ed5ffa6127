"""Modules that write their own state, or mix examples, when called in their current mode.

The engine asks ``writes_state()`` before every call of a module of one of
``WRITER_TYPES`` (through its state guard, ``privgrad.engine.guard``), through the root or
a submodule called directly, with or without grad: such a call is refused before it writes
anything. ``validate()`` reports the same configurations before training starts
(``privgrad.validation.checks.check_embedding_max_norm()`` and the BatchNorm checks). Any other
in-place write is caught by the guard's version counters just after it happens.
"""

from __future__ import annotations

from torch import nn

__all__ = ["WRITER_TYPES", "writes_state"]

_BATCH_NORM = nn.modules.batchnorm._BatchNorm
_INSTANCE_NORM = nn.modules.instancenorm._InstanceNorm

WRITER_TYPES = (_BATCH_NORM, _INSTANCE_NORM, nn.Embedding, nn.EmbeddingBag)


def writes_state(module: nn.Module) -> str | None:
    """Why calling ``module`` now would write its state or mix examples, with the fix, or
    ``None`` if it would not."""
    if isinstance(module, _BATCH_NORM) and module.training:
        return ("normalise with batch statistics and update its running statistics, because it "
                "is in training mode. Fix: call .eval() on it after every model.train() (frozen "
                "BatchNorm), or replace it (privgrad.fix(model))")
    if (isinstance(module, _INSTANCE_NORM) and module.training and module.track_running_stats):
        return ("update its running statistics (training mode with track_running_stats=True). "
                "Fix: call .eval() on it after model.train(), or construct it with "
                "track_running_stats=False (privgrad.fix(model))")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
        return (f"renormalise, in place, the rows of the tokens it looks up (max_norm="
                f"{module.max_norm}). Fix: set max_norm=None; to keep rows bounded, project the "
                f"weight after each optimizer.step() (post-processing of the released weight)")
    return None
