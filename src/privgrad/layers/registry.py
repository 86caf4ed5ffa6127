"""Which rule serves which module type: an explicit literal, extended without global state.

Lookup: the exact type first; then a subclass of a registered type *whose forward is the
registered type's own forward* (a subclass that overrides ``forward`` may compute something else,
so it does not inherit the rule); then the generic ``torch.func`` rule, if allowed.

Types of optional libraries (Hugging Face ``transformers``) are keyed by their qualified class
name, ``"module.QualName"``, and matched by name: privgrad never imports those libraries.

Beside the rules, ``FAMILY_CHECKS`` lists the checks and fixes that layer families keep
next to their rules, which ``privgrad.validate`` and ``privgrad.fix`` run.

>>> registry = RuleRegistry.default().with_rule(MyLayer, MyLayerRule())   # doctest: +SKIP
>>> engine.make_private(..., rules=registry)                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from privgrad.layers.attention import (
    MultiheadAttentionRule,
    check_attention_dropout,
    fix_attention_dropout,
)
from privgrad.layers.base import LayerRule
from privgrad.layers.conv import ConvRule
from privgrad.layers.embedding import EmbeddingBagRule, EmbeddingRule
from privgrad.layers.generic import GenericRule
from privgrad.layers.linear import LinearRule
from privgrad.layers.norm import GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule
from privgrad.layers.rnn import (
    RecurrentCellRule,
    RecurrentRule,
    check_recurrent_dropout,
    fix_recurrent_dropout,
)
from privgrad.layers.sequence_first import check_sequence_first, fix_sequence_first
from privgrad.layers.transformers import NeutralWeightNormRule, TransposedLinearRule

_conv, _instance = ConvRule(), InstanceNormRule()
_recurrent, _cell = RecurrentRule(), RecurrentCellRule()
_rms_hf = NeutralWeightNormRule(neutral=1.0)  # weight * normalised(x)
_rms_one_plus = NeutralWeightNormRule(neutral=0.0)  # (1 + weight) * normalised(x)

BUILTIN_RULES: Mapping[type[nn.Module] | str, LayerRule] = {
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
    nn.RNN: _recurrent,
    nn.LSTM: _recurrent,
    nn.GRU: _recurrent,
    nn.RNNCell: _cell,
    nn.LSTMCell: _cell,
    nn.GRUCell: _cell,
    nn.MultiheadAttention: MultiheadAttentionRule(),
    # Hugging Face transformers, by qualified name (the library is never imported here).
    "transformers.pytorch_utils.Conv1D": TransposedLinearRule(),
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": _rms_hf,
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm": _rms_hf,
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm": _rms_hf,
    "transformers.models.t5.modeling_t5.T5LayerNorm": _rms_hf,
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm": _rms_one_plus,
}

GENERIC_RULE = GenericRule()

#: What layer families check and fix beside their rules, as ``(check, fix)`` pairs in the order
#: ``privgrad.validate`` reports and ``privgrad.fix`` applies them (after the cross-cutting
#: checks of ``privgrad.validation``): ``check(module) -> LayerFinding | None`` and
#: ``fix(module) -> (new module, what it is now, why) | None``. They look at a module's type and
#: configuration whichever rule serves it, or none (a transformer's layout).
FAMILY_CHECKS = (
    (check_recurrent_dropout, fix_recurrent_dropout),
    (check_attention_dropout, fix_attention_dropout),
    (check_sequence_first, fix_sequence_first),
)


class RuleRegistry:
    """An immutable map from module types to rules.

    Args:
        rules: the type -> rule map.
        allow_generic: use the generic ``torch.func`` rule for a module with trainable
            parameters and no dedicated rule (the default). With ``False`` such a module is an
            error that names it and the fixes.
    """

    def __init__(self, rules: Mapping[type[nn.Module] | str, LayerRule], *,
                 allow_generic: bool = True):
        self._rules = dict(rules)
        self.allow_generic = allow_generic

    @classmethod
    def default(cls) -> RuleRegistry:
        return cls(BUILTIN_RULES)

    def with_rule(self, module_type: type[nn.Module] | str, rule: LayerRule) -> RuleRegistry:
        """A new registry with ``rule`` serving ``module_type`` (a class, or a class's qualified
        name ``"package.module.Class"`` to avoid importing an optional library); this one is
        unchanged."""
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
        rule = self._entry(kind)
        if rule is not None:
            return rule
        for base in kind.__mro__[1:]:
            rule = self._entry(base)
            if rule is not None and kind.forward is base.forward:
                return rule
        return None

    def _entry(self, kind: type) -> LayerRule | None:
        rule = self._rules.get(kind)
        return rule if rule is not None else self._rules.get(qualified_name(kind))

    def lookup(self, module: nn.Module) -> LayerRule | None:
        """The rule for ``module``: dedicated, else generic if allowed, else ``None``."""
        rule = self.dedicated(module)
        if rule is None and self.allow_generic:
            return GENERIC_RULE
        return rule

    def __contains__(self, module_type: type | str) -> bool:
        return module_type in self._rules or (
            isinstance(module_type, type) and qualified_name(module_type) in self._rules)


def qualified_name(kind: type) -> str:
    """``"package.module.Class"``: how optional libraries' types are keyed."""
    return f"{kind.__module__}.{kind.__qualname__}"
