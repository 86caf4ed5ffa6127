"""``opacus.utils``: the two helpers Opacus code imports from here (the package name is
Opacus's import path, kept so that only the import line changes)."""

from privgrad.opacus.utils import batch_memory_manager, uniform_sampler

__all__ = ["batch_memory_manager", "uniform_sampler"]
