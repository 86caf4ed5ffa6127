"""Model checks before private training, and fixes for what can be fixed.

``validate(model)`` lists every finding (module path, what is wrong, why it matters for privacy,
the fix); ``fix(model)`` returns a fixed copy and the replacements it made. ``make_private``
validates first and refuses a model with findings, naming every one.
"""

from privgrad.validate.checks import Finding, validate
from privgrad.validate.fixes import Replacement, fix

__all__ = ["Finding", "Replacement", "fix", "validate"]
