"""The Opacus API on privgrad: Opacus code runs with its import line changed.

>>> import privgrad.opacus as opacus                      # was: import opacus
>>> from privgrad.opacus import PrivacyEngine             # was: from opacus import PrivacyEngine

Every name here is a thin adapter over privgrad's own API (no Opacus code, and Opacus need not
be installed): ``PrivacyEngine`` over ``privgrad.PrivacyEngine``, ``BatchMemoryManager`` over
its ``virtual_batches``, ``ModuleValidator`` over ``privgrad.validate``/``privgrad.fix``, the
accountants over ``privgrad.accounting``, ``GradSampleModule`` over ``privgrad.engine``, the
``DP*`` layers as the ``torch.nn`` layers privgrad serves exactly. Where Opacus behaviour is
unsafe, privgrad's wins; docs/migration.md ("privgrad.opacus") lists every difference.

Import paths served (those of Opacus's examples and tutorials): ``privgrad.opacus``
(``PrivacyEngine``, ``GradSampleModule``, ``BatchMemoryManager``, ``ModuleValidator``,
``DPDDP``), ``.accountants`` (``.utils.get_noise_multiplier``), ``.data_loader``,
``.distributed``, ``.grad_sample`` (``.functorch.make_functional``), ``.layers``,
``.optimizers`` (``.optimizer``), ``.privacy_engine``, ``.utils.batch_memory_manager``,
``.utils.uniform_sampler``, ``.validators``.
"""

from privgrad.opacus import (
    accountants,
    data_loader,
    distributed,
    grad_sample,
    layers,
    optimizers,
    privacy_engine,
    utils,
    validators,
)
from privgrad.opacus.distributed import (
    DPDDP,
    DifferentiallyPrivateDistributedDataParallel,
)
from privgrad.opacus.grad_sample import GradSampleModule
from privgrad.opacus.privacy_engine import PrivacyEngine
from privgrad.opacus.utils.batch_memory_manager import BatchMemoryManager
from privgrad.opacus.validators import ModuleValidator

__all__ = [
    "BatchMemoryManager",
    "DPDDP",
    "DifferentiallyPrivateDistributedDataParallel",
    "GradSampleModule",
    "ModuleValidator",
    "PrivacyEngine",
    "accountants",
    "data_loader",
    "distributed",
    "grad_sample",
    "layers",
    "optimizers",
    "privacy_engine",
    "utils",
    "validators",
]
