"""The exceptions privgrad raises.

Every message has one shape: what must hold, the name and value that broke it, and the fix.
Each class also derives from the built-in exception a caller would expect (``ValueError`` for a
bad value, ``TypeError`` for a bad type), so ``except ValueError`` keeps working.

This module imports no torch.
"""

from __future__ import annotations

__all__ = [
    "PrivgradError",
    "ConfigError",
    "ConfigTypeError",
    "UnsupportedModuleError",
    "ModelValidationError",
    "PrivacyBudgetError",
    "PrivacyStateError",
    "CheckpointError",
]


class PrivgradError(Exception):
    """Base class of every error privgrad raises on purpose."""


class ConfigError(PrivgradError, ValueError):
    """An argument has a value that cannot be used (negative noise, unknown mode, ...)."""


class ConfigTypeError(PrivgradError, TypeError):
    """An argument has the wrong type (a string where a number belongs, ...)."""


class UnsupportedModuleError(PrivgradError, TypeError):
    """A module with trainable parameters that no per-sample rule can handle."""


class ModelValidationError(PrivgradError, ValueError):
    """The model breaks an assumption of DP-SGD (e.g. BatchNorm mixes examples)."""

    def __init__(self, message: str, findings: list | None = None):
        super().__init__(message)
        self.findings = list(findings or [])


class PrivacyBudgetError(PrivgradError, ValueError):
    """A privacy target cannot be met (e.g. no noise level below the cap reaches it)."""


class PrivacyStateError(PrivgradError, RuntimeError):
    """The training loop did something the privacy guarantee cannot cover.

    Examples: ``backward()`` twice on one forward pass, ``make_private`` twice on one model.
    """


class CheckpointError(PrivgradError, ValueError):
    """A checkpoint is truncated, corrupt, or belongs to another model or configuration."""
