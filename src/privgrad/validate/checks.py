"""The checks: each looks at one module and may return a :class:`Finding`.

The list of checks is the literal ``CHECKS`` at the bottom; each is a function
``(path, module, registry) -> Finding | None``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from privgrad.layers import RuleRegistry


@dataclass(frozen=True)
class Finding:
    """One problem with one module.

    Attributes:
        path: the module's path in the model (``""`` for the root).
        module_type: its class name.
        problem: what is wrong.
        why: why it matters for privacy.
        fix: what to do (``privgrad.fix`` applies it where ``fixable``).
        fixable: whether ``privgrad.fix(model)`` repairs it.
    """

    path: str
    module_type: str
    problem: str
    why: str
    fix: str
    fixable: bool = False

    def __str__(self) -> str:
        where = self.path or "<root>"
        return f"{where} ({self.module_type}): {self.problem}. Why: {self.why}. Fix: {self.fix}"


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def check_batch_norm(path: str, module: nn.Module, registry: RuleRegistry) -> Finding | None:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    updates_stats = module.track_running_stats and module.training
    if not (_trainable(module) or updates_stats):
        return None  # frozen and in eval mode: uses fixed statistics only
    what = ("has trainable parameters" if _trainable(module) else
            "is frozen but in training mode, so its running statistics keep learning")
    return Finding(
        path, type(module).__name__, f"BatchNorm {what}",
        "BatchNorm normalises each example with statistics of the whole batch, so one example's "
        "gradient depends on the others and its running statistics (saved with the model) are "
        "computed from private data without noise",
        "replace it with GroupNorm (privgrad.fix(model) does this), or freeze it and keep it in "
        "eval mode (module.eval() after every model.train())",
        fixable=True)


def check_instance_norm_stats(path: str, module: nn.Module, registry) -> Finding | None:
    if not isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return None
    if module.track_running_stats and module.training:
        return Finding(
            path, type(module).__name__,
            "InstanceNorm with track_running_stats=True in training mode",
            "its running statistics are averaged over private examples without noise and saved "
            "with the model",
            "construct it with track_running_stats=False (privgrad.fix(model) does this)",
            fixable=True)
    return None


def check_rule(path: str, module: nn.Module, registry: RuleRegistry) -> Finding | None:
    if not _trainable(module):
        return None
    rule = registry.lookup(module)
    if rule is None:
        return Finding(
            path, type(module).__name__, "trainable parameters with no per-sample rule",
            "DP-SGD must clip every example's gradient; a parameter without per-sample "
            "gradients cannot be clipped or privatised",
            "write a rule (docs/custom_layers.md), freeze the module (requires_grad_(False)), "
            "or allow the generic torch.func rule (RuleRegistry.default())")
    reason = rule.check(module)
    if reason is not None:
        return Finding(
            path, type(module).__name__, reason,
            "its per-sample gradients cannot be computed exactly as configured",
            "change the configuration as described, or freeze the module")
    return None


CHECKS = (check_batch_norm, check_instance_norm_stats, check_rule)


def validate(model: nn.Module, *, rules: RuleRegistry | None = None) -> list[Finding]:
    """Every finding for ``model``, in module order (an empty list means ready to train).

    Args:
        model: the model to check (not modified).
        rules: the rule registry training will use (default: the built-in rules plus the
            generic rule).
    """
    registry = rules if rules is not None else RuleRegistry.default()
    findings = []
    for path, module in model.named_modules():
        for check in CHECKS:
            finding = check(path, module, registry)
            if finding is not None:
                findings.append(finding)
    return findings
