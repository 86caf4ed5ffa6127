"""Which rule serves which module type: an explicit literal, extended without global state.

Lookup: the exact type first; then a subclass of a registered type *whose forward is the
registered type's own forward* (a subclass that overrides ``forward`` may compute something else,
so it does not inherit the rule); then the generic ``torch.func`` rule, if allowed.

>>> registry = RuleRegistry.default().with_rule(MyLayer, MyLayerRule())   # doctest: +SKIP
>>> engine.make_private(..., rules=registry)                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from privgrad.layers.base import LayerRule
from privgrad.layers.conv import ConvRule
from privgrad.layers.embedding import EmbeddingBagRule, EmbeddingRule
from privgrad.layers.generic import GenericRule
from privgrad.layers.linear import LinearRule
from privgrad.layers.norm import GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule

_conv, _instance = ConvRule(), InstanceNormRule()

BUILTIN_RULES: Mapping[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.Embedding: EmbeddingRule(),
    nn.EmbeddingBag: EmbeddingBagRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.InstanceNorm1d: _instance,
    nn.InstanceNorm2d: _instance,
    nn.InstanceNorm3d: _instance,
    nn.RMSNorm: RMSNormRule(),
}

GENERIC_RULE = GenericRule()


class RuleRegistry:
    """An immutable map from module types to rules.

    Args:
        rules: the type -> rule map.
        allow_generic: use the generic ``torch.func`` rule for a module with trainable
            parameters and no dedicated rule (the default). With ``False`` such a module is an
            error that names it and the fixes.
    """

    def __init__(self, rules: Mapping[type[nn.Module], LayerRule], *, allow_generic: bool = True):
        self._rules = dict(rules)
        self.allow_generic = allow_generic

    @classmethod
    def default(cls) -> RuleRegistry:
        return cls(BUILTIN_RULES)

    def with_rule(self, module_type: type[nn.Module], rule: LayerRule) -> RuleRegistry:
        """A new registry with ``rule`` serving ``module_type``; this one is unchanged."""
        if not isinstance(rule, LayerRule):
            from privgrad.errors import ConfigTypeError

            raise ConfigTypeError(
                f"rule must be a privgrad.layers.LayerRule; got rule={rule!r}. Subclass "
                f"LayerRule and implement per_sample_gradients (see docs/custom_layers.md).")
        return RuleRegistry({**self._rules, module_type: rule}, allow_generic=self.allow_generic)

    def without_generic(self) -> RuleRegistry:
        """A new registry that refuses modules without a dedicated rule."""
        return RuleRegistry(self._rules, allow_generic=False)

    def dedicated(self, module: nn.Module) -> LayerRule | None:
        """The dedicated rule for ``module``, or ``None``."""
        kind = type(module)
        if kind in self._rules:
            return self._rules[kind]
        for base in kind.__mro__[1:]:
            if base in self._rules and kind.forward is base.forward:
                return self._rules[base]
        return None

    def lookup(self, module: nn.Module) -> LayerRule | None:
        """The rule for ``module``: dedicated, else generic if allowed, else ``None``."""
        rule = self.dedicated(module)
        if rule is None and self.allow_generic:
            return GENERIC_RULE
        return rule

    def __contains__(self, module_type: type) -> bool:
        return module_type in self._rules
