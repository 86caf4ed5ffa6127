"""Model checks before private training, and fixes for what can be fixed.

``validate(model)`` lists every finding (module path, what is wrong, why it matters for privacy,
the fix); ``fix(model)`` returns a fixed copy (``fix(model, report=lst)`` also lists the
replacements it made). ``make_private``
validates first and refuses a model with findings, naming every one.

The package is ``privgrad.validation``, not ``privgrad.validate``: a subpackage of that name
would replace the function ``privgrad.validate`` as soon as it was imported.
"""

from privgrad.validation.checks import Finding, validate
from privgrad.validation.fixes import Replacement, fix
from privgrad.validation.replacements import FrozenBatchNorm

__all__ = ["Finding", "FrozenBatchNorm", "Replacement", "fix", "validate"]
