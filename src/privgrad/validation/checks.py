"""The checks: each looks at one module and may return a
[`Finding`][privgrad.validation.checks.Finding].

The list of checks is the literal ``CHECKS`` at the bottom; each is a function
``(path, module, registry) -> Finding | None``. The cross-cutting checks are here (BatchNorm,
InstanceNorm statistics, Embedding ``max_norm``, randomness under the generic rule, parameters
no call uses); a layer family's own checks live beside its rule and come from the literal
``privgrad.layers.registry.FAMILY_CHECKS``, and a rule's refusal from
[`finding()`][privgrad.LayerRule.finding]. A finding on a module covers the modules inside it
for the same check (a sequence-first ``nn.TransformerEncoder`` is one finding, not one per
layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from privgrad.layers import LayerFinding, RuleRegistry
from privgrad.layers.generic import GenericRule
from privgrad.layers.registry import FAMILY_CHECKS


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
    batch_statistics = module.training or not module.track_running_stats
    if not (_trainable(module) or batch_statistics):
        return None  # frozen and in eval mode: uses fixed statistics only
    if _trainable(module):
        what, fix = "has trainable parameters", (
            "replace it with GroupNorm (privgrad.fix(model) does this, keeping its scale and "
            "shift), or freeze it and keep it in eval mode")
    elif module.track_running_stats:
        what, fix = "is frozen but in training mode, so its running statistics keep learning", (
            "privgrad.fix(model) swaps in privgrad.validation.FrozenBatchNorm (the eval-mode "
            "layer, same state_dict keys), or call module.eval() after every model.train()")
    else:
        what, fix = "has no running statistics (track_running_stats=False), so it always "\
            "normalises with batch statistics", "replace it with GroupNorm (privgrad.fix(model) "\
            "does this)"
    return Finding(
        path, type(module).__name__, f"BatchNorm {what}",
        "BatchNorm normalises each example with statistics of the whole batch, so one example's "
        "gradient depends on the others and its running statistics (saved with the model) are "
        "computed from private data without noise",
        fix, fixable=True)


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


def check_embedding_max_norm(path: str, module: nn.Module, registry) -> Finding | None:
    if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.max_norm is None:
        return None
    return Finding(
        path, type(module).__name__, f"max_norm={module.max_norm} (frozen or trainable)",
        "every lookup renormalises, in place and without noise, exactly the rows of the tokens "
        "in the private batch, so the saved weight shows which tokens were seen",
        "set max_norm=None; to keep rows bounded, project the weight after each "
        "optimizer.step() (post-processing of the released weight, e.g. with torch.renorm)")


def check_generic_randomness(path: str, module: nn.Module,
                             registry: RuleRegistry) -> Finding | None:
    if not _trainable(module) or not isinstance(registry.lookup(module), GenericRule):
        return None
    random = [p for p, m in module.named_modules() if p and m.training
              and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if not random:
        return None
    return Finding(
        path, type(module).__name__,
        f"served by the generic torch.func rule, which re-runs its forward per example, but it "
        f"contains dropout ({', '.join(random)}) whose mask cannot be drawn again",
        "the per-sample gradients would use other masks than the forward pass did, so the "
        "rule refuses and training would stop with an error at the first step",
        "write a rule for it (docs/custom_layers.md), set that dropout's p to 0, or keep its "
        "own parameters in a child module that has a rule")


def check_uncalled_parameters(path: str, module: nn.Module, registry) -> Finding | None:
    if not _trainable(module) or type(module).forward is not nn.Module.forward:
        return None
    return Finding(
        path, type(module).__name__,
        "trainable parameters on a module that is never called (it has no forward)",
        "another module uses these parameters directly, and per-sample gradients come from "
        "module calls: no rule would see that use, so they would receive noise but no signal "
        "(peft keeps LoRA adapters of embeddings in such containers)",
        "freeze them (requires_grad_(False)), or write a rule for the module that uses them that "
        "serves them (LayerRule.serves_children, see docs/custom_layers.md)")


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
    return _reported(path, module, rule.finding(module))


def _reported(path: str, module: nn.Module, found: LayerFinding | None) -> Finding | None:
    """A layer's finding, placed at the module's path."""
    if found is None:
        return None
    return Finding(path, type(module).__name__, found.problem, found.why, found.fix,
                   fixable=found.fixable)


def _family_check(check):
    """A layer family's ``module -> LayerFinding | None`` as a check of ``CHECKS``."""
    def family_check(path: str, module: nn.Module, registry) -> Finding | None:
        return _reported(path, module, check(module))
    family_check.__name__ = check.__name__
    return family_check


CHECKS = (
    check_batch_norm,
    check_instance_norm_stats,
    check_embedding_max_norm,
    *(_family_check(check) for check, _ in FAMILY_CHECKS),
    check_generic_randomness,
    check_uncalled_parameters,
    check_rule,
)


def validate(model: nn.Module, *, rules: RuleRegistry | None = None) -> list[Finding]:
    """Every finding for ``model``, in module order (an empty list means ready to train).

    Args:
        model: the model to check (not modified).
        rules: the rule registry training will use (default: the built-in rules plus the
            generic rule).
    """
    registry = rules if rules is not None else RuleRegistry.default()
    findings, covered = [], {check: [] for check in CHECKS}
    for path, module in model.named_modules():
        for check in CHECKS:
            if any(_inside(path, outer) for outer in covered[check]):
                continue
            finding = check(path, module, registry)
            if finding is not None:
                findings.append(finding)
                covered[check].append(path)
    return findings


def _inside(path: str, outer: str) -> bool:
    """True if module ``path`` lies strictly inside module ``outer``."""
    return path != outer and (outer == "" or path.startswith(f"{outer}."))
