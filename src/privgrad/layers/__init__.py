"""Per-sample gradient rules, one layer family a file, and the registry that maps types to rules."""

from privgrad.layers.base import Capture, LayerRule
from privgrad.layers.generic import GenericRule
from privgrad.layers.registry import BUILTIN_RULES, RuleRegistry

__all__ = ["BUILTIN_RULES", "Capture", "GenericRule", "LayerRule", "RuleRegistry"]
