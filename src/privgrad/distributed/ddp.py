"""A model wrapped in ``DistributedDataParallel``: keep DDP from sending raw gradients.

DDP all-reduces the ordinary autograd gradients in buckets during ``backward()``. Under DP-SGD
those gradients are neither clipped nor noised, and privgrad overwrites ``p.grad`` with the
private gradient before the optimizer reads it anyway, so that traffic would only (a) put raw,
unclipped gradient sums on the wire and (b) double the communication. privgrad therefore
registers a DDP *communication hook* (DDP's public extension point) that communicates nothing
while the engine is attached: each bucket comes back as the rank's own local gradient. The one
all-reduce of the step happens later, on the clipped sums (see
[`DataParallel`][privgrad.distributed.context.DataParallel]). When the engine detaches, the hook
falls back to DDP's default averaging all-reduce, so the model is an ordinary DDP model again.

DDP keeps the rest of its behaviour: parameters are broadcast from rank 0 when it is built, and
``model.module`` is the user's model with its own ``state_dict()`` keys (the ``module.`` prefix of
``model.state_dict()`` is DDP's, not privgrad's).
"""

# No ``from __future__ import annotations``: DDP inspects the hook's annotations at runtime.

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from privgrad.errors import ConfigError

__all__ = ["DistributedDataParallel", "PrivateCommHook", "prepare_ddp"]


class PrivateCommHook:
    """State of the communication hook: ``private`` while a privacy engine is attached."""

    def __init__(self, process_group):
        self.process_group = process_group
        self.private = True


def _local_gradients_only(state: PrivateCommHook, bucket):
    """DDP communication hook: no communication while ``state.private`` (each bucket keeps this
    rank's own gradient, which privgrad then replaces); DDP's averaging all-reduce otherwise."""
    if state.private:
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future
    return default_hooks.allreduce_hook(state.process_group, bucket)


def prepare_ddp(model: DistributedDataParallel) -> PrivateCommHook:
    """Check that ``model`` can train privately and register the no-communication hook.

    Privacy:
        After this call DDP sends no gradient of ``model`` over the network while the returned
        state has ``private=True``; raw per-rank gradients stay on their rank.

    Raises:
        ConfigError: DDP would make collective calls in every forward pass (buffer
            broadcasting), or another communication hook is already registered.
    """
    if model.will_sync_module_buffers():
        raise ConfigError(
            "a DistributedDataParallel model under privgrad must not broadcast buffers in every "
            "forward pass (ranks run different numbers of forward passes per step when virtual "
            "batches split their Poisson batches differently, so the collective calls would not "
            "match); got DistributedDataParallel(broadcast_buffers=True) on a model with buffers. "
            "Build it with DistributedDataParallel(model, broadcast_buffers=False): DDP still "
            "broadcasts them once when it is built.")
    state = PrivateCommHook(model.process_group)
    try:
        model.register_comm_hook(state, _local_gradients_only)
    except RuntimeError as e:
        raise ConfigError(
            "privgrad must own the DistributedDataParallel communication hook (it keeps raw "
            "gradients off the network); got a model with a communication hook already "
            "registered. Wrap a fresh DistributedDataParallel(model) without register_comm_hook, "
            "or pass the unwrapped model (privgrad synchronises it itself).") from e
    return state
