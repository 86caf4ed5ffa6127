"""Per-sample gradient rules, one layer family a file, and the registry that maps types to rules.

A rule is the privacy contract ([`LayerRule`][privgrad.LayerRule]) plus, where it makes a step
cheaper, the opt-in speed hooks ([`SpeedHooks`][privgrad.layers.speed.SpeedHooks])."""

from privgrad.layers.base import Capture, LayerFinding, LayerRule
from privgrad.layers.generic import GenericRule
from privgrad.layers.registry import BUILTIN_RULES, RuleRegistry
from privgrad.layers.speed import SpeedHooks, speed_hooks

__all__ = ["BUILTIN_RULES", "Capture", "GenericRule", "LayerFinding", "LayerRule", "RuleRegistry",
           "SpeedHooks", "speed_hooks"]
