"""``opacus.validators.ModuleValidator`` on ``privgrad.validate`` and ``privgrad.fix``.

The checks are privgrad's, not Opacus's list: they cover what Opacus checks (BatchNorm, layers
no rule serves) and more (running statistics of InstanceNorm, embedding ``max_norm``, dropout
inside recurrent and attention layers, sequence-first transformer layers, parameters no call
uses); see ``privgrad.validation``. Differences from Opacus 1.6.0 (docs/migration.md):

- ``validate`` returns (or, with ``strict=True``, raises) ``privgrad.errors.
  ModelValidationError`` values, one per finding, each carrying its ``Finding`` in
  ``.findings``; Opacus returns its own ``UnsupportedModuleError`` values.
- A model in eval mode is not a finding (Opacus reports "Model needs to be in training mode"):
  privgrad checks the modes that matter (a BatchNorm in training mode) where they matter.
- ``fix`` repairs a deep copy, as Opacus does, and returns it; it takes no keyword arguments.

>>> model = ModuleValidator.fix(model)            # doctest: +SKIP
>>> ModuleValidator.validate(model, strict=True)   # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

import privgrad
from privgrad import _validate
from privgrad.errors import ModelValidationError

__all__ = ["ModuleValidator"]


def _check_module(module) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise _validate.fail("module must be a torch.nn.Module", "module", type(module).__name__,
                             "Pass your model.")
    return module


class ModuleValidator:
    """Opacus's validator API over privgrad's checks and fixes (class methods only).

    Privacy:
        ``make_private`` runs the same checks and refuses a model with any finding, so passing
        these checks is what privgrad needs; a model they pass still meets the run-time guards
        of the engine (see docs/privacy.md).
    """

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> list[ModelValidationError]:
        """The findings for ``module`` as errors, one per finding (an empty list: ready).

        Raises:
            ModelValidationError: with ``strict=True``, one error naming every finding.
        """
        findings = privgrad.validate(_check_module(module))
        if strict and findings:
            listed = "\n  - ".join(str(f) for f in findings)
            raise ModelValidationError(
                f"the model is not ready for private training ({len(findings)} finding(s)):\n"
                f"  - {listed}\nModuleValidator.fix(model) repairs the findings marked fixable.",
                findings)
        return [ModelValidationError(str(f), [f]) for f in findings]

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        """Whether ``module`` has no finding."""
        return not privgrad.validate(_check_module(module))

    @classmethod
    def fix(cls, module: nn.Module, **kwargs) -> nn.Module:
        """A repaired deep copy of ``module`` (``module`` itself is untouched); findings that
        are not fixable remain, for ``validate`` to report."""
        if kwargs:
            raise _validate.fail("ModuleValidator.fix takes the module only", "keywords",
                                 sorted(kwargs), "Call ModuleValidator.fix(model).")
        return privgrad.fix(_check_module(module))

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs) -> nn.Module:
        """``fix``, then ``validate(strict=True)``; returns the repaired copy."""
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed
