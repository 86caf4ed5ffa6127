"""Empirical privacy auditing: measure, in one training run, how much privacy a run really has.

White-box gradient canaries (``canaries``, torch) go through privgrad's real Poisson sampler,
clipping and noise; black-box input canaries (``input_canaries``, torch) are ordinary examples
in the user's own loop, scored by their loss. The one-run lower bound of Steinke, Nasr and
Jagielski (2023) and the conformance tests (``statistics``, ``conformance``), the f-DP bound of
Mahloujifar, Melis and Chaudhuri (2024, ``fdp``), the simulated band of a correct implementation
(``simulation``), the report with its verdict (``report``) and the auditor of any attack's
canary scores (``scores``, ``intervals``) run in NumPy. ``builtin`` is the audit behind
``privgrad audit``. See docs/auditing.md.

Names are imported lazily, so ``import privgrad.auditing.statistics`` (or ``simulation``,
``report``, ``fdp``, ``scores``) never imports torch.

>>> from privgrad import PrivacyEngine
>>> from privgrad.auditing import run_builtin_audit, BuiltinAudit
>>> print(run_builtin_audit(PrivacyEngine(), BuiltinAudit(epsilon=4.0)).text())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "GradientCanaries": "privgrad.auditing.canaries",
    "CanaryDataset": "privgrad.auditing.canaries",
    "CanaryBatch": "privgrad.auditing.canaries",
    "ModelWithCanaries": "privgrad.auditing.canaries",
    "InputCanaries": "privgrad.auditing.input_canaries",
    "mislabeled_canaries": "privgrad.auditing.input_canaries",
    "BuiltinAudit": "privgrad.auditing.builtin",
    "run_builtin_audit": "privgrad.auditing.builtin",
    "run_builtin_black_box_audit": "privgrad.auditing.builtin",
    "AuditReport": "privgrad.auditing.report",
    "Observations": "privgrad.auditing.report",
    "evaluate": "privgrad.auditing.report",
    "evaluate_scores": "privgrad.auditing.scores",
    "audit_scores": "privgrad.auditing.scores",
    "ScoreAudit": "privgrad.auditing.scores",
    "FDPBound": "privgrad.auditing.report",
    "fdp_lower_bound": "privgrad.auditing.fdp",
    "AuditSettings": "privgrad.auditing.simulation",
    "Band": "privgrad.auditing.simulation",
    "simulate_band": "privgrad.auditing.simulation",
    "one_run_lower_bound": "privgrad.auditing.statistics",
    "one_run_p_value": "privgrad.auditing.statistics",
    "ceiling": "privgrad.auditing.statistics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'privgrad.auditing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
