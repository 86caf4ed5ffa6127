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

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'privgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
