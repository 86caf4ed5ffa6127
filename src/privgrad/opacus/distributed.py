"""``opacus.distributed``: ``DifferentiallyPrivateDistributedDataParallel`` (``DPDDP``).

Opacus wraps the model in a module that broadcasts rank 0's parameters when it is built (its
``DistributedDPOptimizer`` then sums the gradients). privgrad wraps nothing: ``DPDDP(model)``
broadcasts rank 0's parameters and buffers to every rank of the default process group and
returns **the model itself** (``state_dict()`` keys unchanged, no ``.module``).
``make_private`` then joins the process group by itself: one global Poisson sample split
between the ranks, the clipped sums added on rank 0, the noise drawn once (see
docs/distributed.md). ``isinstance(x, DPDDP)`` is not available (it is a function).
"""

from __future__ import annotations

from torch import nn

from privgrad import _validate
from privgrad.distributed import data_parallel

__all__ = ["DPDDP", "DifferentiallyPrivateDistributedDataParallel"]


def DifferentiallyPrivateDistributedDataParallel(model: nn.Module) -> nn.Module:  # noqa: N802
    """Give every rank rank 0's parameters and buffers; return ``model`` itself.

    Raises:
        ConfigError: no ``torch.distributed`` process group is initialised (Opacus fails
            there too).

    Privacy:
        Nothing private crosses the wire here: the model's initial state only.
    """
    if not isinstance(model, nn.Module):
        raise _validate.fail("DPDDP takes a torch.nn.Module", "model", type(model).__name__,
                             "Pass your model.")
    ranks = data_parallel(None, model, True)
    if ranks is None:
        raise _validate.fail(
            "DPDDP needs an initialised torch.distributed process group",
            "torch.distributed.is_initialized()", False,
            "Call torch.distributed.init_process_group('gloo') (or 'nccl') first, or train in "
            "one process without DPDDP.")
    ranks.attach(model)
    return model


DPDDP = DifferentiallyPrivateDistributedDataParallel
