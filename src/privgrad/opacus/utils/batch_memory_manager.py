"""``opacus.utils.batch_memory_manager.BatchMemoryManager`` on ``engine.virtual_batches``.

Opacus splits each Poisson batch into physical batches and has its ``DPOptimizer`` skip the
steps of all but the last. privgrad's engine does the same natively
(``privgrad.PrivacyEngine.virtual_batches``); this context manager is that, under Opacus's
name and keywords. The optimizer must be the one ``privgrad.opacus.PrivacyEngine.make_private``
returned: it knows its engine.
"""

from __future__ import annotations

from privgrad import _validate
from privgrad.opacus.optimizers.view import PrivateOptimizer

__all__ = ["BatchMemoryManager"]


class BatchMemoryManager:
    """A context manager that yields the physical batches of ``data_loader``'s logical ones.

    Args:
        data_loader: the loader ``make_private`` returned.
        max_physical_batch_size: the largest physical batch.
        optimizer: the optimizer ``make_private`` returned.

    Privacy:
        As ``privgrad.PrivacyEngine.virtual_batches``: each example is clipped once, the noise
        is drawn once per logical batch (at the step after its last physical batch), and
        leaving the block in the middle of a logical batch releases nothing of it.
    """

    def __init__(self, *, data_loader, max_physical_batch_size: int, optimizer):
        if not isinstance(optimizer, PrivateOptimizer):
            raise _validate.fail(
                "BatchMemoryManager needs the optimizer make_private returned", "optimizer",
                type(optimizer).__name__,
                "Pass the optimizer privgrad.opacus.PrivacyEngine.make_private returned (with "
                "privgrad's own API: engine.virtual_batches(loader, max_physical_batch_size)).")
        self._batches = optimizer.privacy_engine.virtual_batches(data_loader,
                                                                 max_physical_batch_size)

    def __enter__(self):
        return self._batches.__enter__()

    def __exit__(self, *exc):
        return self._batches.__exit__(*exc)
