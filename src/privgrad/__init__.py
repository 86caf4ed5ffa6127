"""privgrad: differentially private training (DP-SGD) for any PyTorch model.

The public surface is this explicit list. Names are imported lazily (PEP 562) so that
``import privgrad.accounting`` never pulls in torch.

>>> from privgrad import PrivacyEngine
>>> engine = PrivacyEngine()
>>> model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
...     data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never at run time: the public names as static imports, for type checkers and griffe
    from privgrad.accounting import PLDAccountant as PLDAccountant
    from privgrad.accounting import RDPAccountant as RDPAccountant
    from privgrad.accounting import get_noise_multiplier as get_noise_multiplier
    from privgrad.attachment import detach as detach
    from privgrad.engine import PerSampleGradients as PerSampleGradients
    from privgrad.engine import per_sample_gradients as per_sample_gradients
    from privgrad.layers import LayerRule as LayerRule
    from privgrad.layers import RuleRegistry as RuleRegistry
    from privgrad.privacy_engine import PrivacyEngine as PrivacyEngine
    from privgrad.validation import fix as fix
    from privgrad.validation import validate as validate

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "PrivacyEngine": "privgrad.privacy_engine",
    "detach": "privgrad.attachment",
    "PerSampleGradients": "privgrad.engine",
    "per_sample_gradients": "privgrad.engine",
    "LayerRule": "privgrad.layers",
    "RuleRegistry": "privgrad.layers",
    "validate": "privgrad.validation",
    "fix": "privgrad.validation",
    "RDPAccountant": "privgrad.accounting",
    "PLDAccountant": "privgrad.accounting",
    "get_noise_multiplier": "privgrad.accounting",
}

# == sorted(_EXPORTS) + ["__version__"], written out so that static tools (griffe, for the API
# reference) can read it; tests/docs/test_site.py checks the two agree.
__all__ = ["LayerRule", "PLDAccountant", "PerSampleGradients", "PrivacyEngine", "RDPAccountant",
           "RuleRegistry", "detach", "fix", "get_noise_multiplier", "per_sample_gradients",
           "validate", "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'privgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
