"""Repairs for the findings marked fixable: each returns a replacement module with the same
role, and ``fix`` applies them to a deep copy of the model.

The list of fixers is the literal ``FIXERS`` at the bottom: ``module -> (new module, what it
is now, why) | None``: the cross-cutting ones here, then each layer family's own, which live
beside its rule (``privgrad.layers.registry.FAMILY_CHECKS``). Fixers that only change a setting
(a dropout inside a layer, the layout of a transformer) change the copy's module in place and
return it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from privgrad.layers.registry import FAMILY_CHECKS
from privgrad.validation.replacements import FrozenBatchNorm


@dataclass(frozen=True)
class Replacement:
    """One module ``fix`` replaced: where, what it was, what it is now, and why."""

    path: str
    old: str
    new: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.old} -> {self.new} ({self.reason})"


def group_count(channels: int, preferred: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``preferred``."""
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def fix_batch_norm(module: nn.Module):
    """Trainable BatchNorm -> GroupNorm; frozen BatchNorm -> ``FrozenBatchNorm``."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    trainable = any(p.requires_grad for p in module.parameters())
    if not (trainable or module.training or not module.track_running_stats):
        return None
    if not trainable and module.track_running_stats:
        return FrozenBatchNorm(module), "FrozenBatchNorm (its eval-mode forward, in every mode)", \
            "a frozen BatchNorm in training mode mixes the batch and learns running statistics"
    c = module.num_features
    # BatchNorm1d often sees (N, C): GroupNorm(C, C) would normalise each feature alone, a
    # constant. One group normalises across the features (a LayerNorm with BatchNorm's
    # per-feature scale and shift), on (N, C) and on (N, C, L) alike.
    g = 1 if isinstance(module, nn.BatchNorm1d) else group_count(c)
    new = nn.GroupNorm(g, c, eps=module.eps, affine=module.affine)
    if module.affine:  # keep a pretrained scale and shift as the starting point
        new.weight, new.bias = module.weight, module.bias
    return new, f"GroupNorm({g}, {c})", "BatchNorm mixes the examples of a batch"


def fix_instance_norm_stats(module: nn.Module):
    if not isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return None
    if not (module.track_running_stats and module.training):
        return None
    new = type(module)(module.num_features, eps=module.eps, momentum=module.momentum,
                       affine=module.affine, track_running_stats=False)
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    return new, f"{type(module).__name__}(track_running_stats=False)", \
        "running statistics would learn from private data"


FIXERS = (
    fix_batch_norm,
    fix_instance_norm_stats,
    *(fix for _, fix in FAMILY_CHECKS),
)


def fix(model: nn.Module, *, report: list | None = None) -> nn.Module:
    """A fixed deep copy of ``model`` (``model`` itself is untouched).

    Args:
        model: the model to fix.
        report: a list to append one [`Replacement`][privgrad.validation.fixes.Replacement] per
            module replaced (what it was, what it is now, why), if you want to know.

    Returns:
        The fixed copy, always (one value: ``model = privgrad.fix(model)``).
    """
    fixed = copy.deepcopy(model)
    replacements = []
    for path, module in list(fixed.named_modules()):
        old = type(module).__name__  # before a fixer that works in place renames it
        for fixer in FIXERS:
            result = fixer(module)
            if result is None:
                continue
            new, description, reason = result
            new.train(module.training)
            if path:
                _set_submodule(fixed, path, new)
            else:
                fixed = new
            replacements.append(Replacement(path, old, description, reason))
            break
    if report is not None:
        report.extend(replacements)
    return fixed


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
