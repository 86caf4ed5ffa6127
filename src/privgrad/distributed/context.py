"""Data-parallel DP-SGD over a ``torch.distributed`` process group.

``make_private`` joins the default process group when one is initialised (or when
``distributed=True``) and then relies on one
[`DataParallel`][privgrad.distributed.context.DataParallel] object for everything that crosses
process boundaries:

* [`DataParallel.agree()`][privgrad.distributed.context.DataParallel.agree]: every rank must attach
  with the same privacy configuration;
* [`DataParallel.attach()`][privgrad.distributed.context.DataParallel.attach]: rank 0's parameters
  and buffers become everyone's (or, for a ``DistributedDataParallel`` model, DDP is kept from
  communicating gradients);
* [`DataParallel.broadcast_seed()`][privgrad.distributed.context.DataParallel.broadcast_seed] and
  [`DataParallel.shard()`][privgrad.distributed.context.DataParallel.shard]: one global Poisson
  sample per step, split between the ranks;
* [`DataParallel.reduce_sums()`][privgrad.distributed.context.DataParallel.reduce_sums],
  [`DataParallel.noise_share()`][privgrad.distributed.context.DataParallel.noise_share] and
  [`DataParallel.broadcast_release()`][privgrad.distributed.context.DataParallel.broadcast_release]:
  the clipped sums are added up on rank 0, rank 0 alone adds the noise to that total, and every rank
  receives rank 0's release.

Privacy:
    The job releases exactly what one process would: at every logical step
    ``(sum over the global Poisson batch of clip(g_i) + N(0, (sigma C)^2 I)) / normaliser``,
    computed by rank 0 with the single-process code on the total clipped sum. Per-sample clipping
    happens on the rank that owns the example; the gradient data on the wire is each rank's
    clipped sum (reduced to rank 0, once per logical step) and the release (broadcast). The noise
    is drawn once, by rank 0, from the same source a single process uses (reproducible or
    secure), so its distribution does not depend on the world size, nor on the other ranks'
    generators.

    What this assumes: all ranks are inside the trust boundary. Each rank can read the whole
    data set (it indexes the global one), rank 0 sees the un-noised total and knows the noise it
    drew, and inside the reduction a rank may see partial sums of other ranks' clipped sums. The
    guarantee is for what leaves the job (the model, its updates, checkpoints), as in a single
    process. See docs/distributed.md for why the noise is not split between the ranks.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from privgrad import _validate
from privgrad._precision import accumulation_dtype
from privgrad.distributed.ddp import DistributedDataParallel, PrivateCommHook, prepare_ddp
from privgrad.distributed.sharding import ShardedSampler
from privgrad.errors import ConfigError, ConfigTypeError

__all__ = ["DataParallel", "data_parallel", "in_process_group", "privacy_fingerprint"]


def in_process_group() -> bool:
    """Whether this process is part of an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def data_parallel(distributed: bool | None, module: nn.Module, poisson_sampling: bool,
                  params: list | None = None, registry=None) -> DataParallel | None:
    """Decide whether ``make_private`` trains data-parallel, and over which group.

    Args:
        distributed: ``None`` (default): data-parallel exactly when a default process group is
            initialised (any world size, 1 included). ``True``: require one. ``False``: train
            this process on its own even inside a process group (never with DDP).
        module: the user's model, possibly a ``DistributedDataParallel``.
        poisson_sampling: the ``make_private`` argument of that name.
        params, registry: the privatised parameters and the layer rules: a model sharded with
            FSDP2 is checked (``privgrad.distributed.fsdp.sharded_model()``) and trained by a
            [`ShardedDataParallel`][privgrad.distributed.fsdp.ShardedDataParallel].

    Returns:
        The [`DataParallel`][privgrad.distributed.context.DataParallel] to use, or ``None`` for
        single-process training.

    Raises:
        ConfigTypeError: ``distributed`` is not a bool or None.
        ConfigError: ``distributed=True`` without an initialised process group; a DDP model with
            ``distributed=False``; ``poisson_sampling=False`` in data-parallel training.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ConfigTypeError(
            f"distributed must be True, False or None; got distributed={distributed!r}. Pass "
            f"None to follow torch.distributed.is_initialized().")
    from privgrad.distributed import fsdp  # (it builds on this module)

    is_ddp = isinstance(module, DistributedDataParallel)
    sharded = params is not None and fsdp.sharded_model(module, params, registry)
    if distributed is False:
        if sharded:
            raise _validate.fail(
                "a fully_shard (FSDP2) model needs data-parallel private training (each rank "
                "holds only shards of the parameters)", "distributed", distributed,
                "Pass distributed=None (the default) or True.")
        if is_ddp:
            raise _validate.fail(
                "a DistributedDataParallel model needs data-parallel private training (alone, "
                "DDP would all-reduce raw, unclipped gradients)", "distributed", distributed,
                "Pass distributed=None (the default) or True, or pass the unwrapped model.")
        return None
    if not in_process_group():
        if distributed:
            raise _validate.fail(
                "distributed=True needs an initialised torch.distributed process group",
                "torch.distributed.is_initialized()", False,
                "Call torch.distributed.init_process_group('gloo') (or 'nccl') before "
                "make_private; torchrun sets the environment it reads. Or pass "
                "distributed=False.")
        return None
    if not poisson_sampling:
        raise _validate.fail(
            "data-parallel private training needs poisson_sampling=True (privgrad splits one "
            "global Poisson sample between the ranks; a per-rank loader's batch_size would make "
            "q and the normaliser wrong by the world size)", "poisson_sampling", poisson_sampling,
            "Drop poisson_sampling=False, or pass distributed=False to train each rank alone.")
    if sharded:
        return fsdp.ShardedDataParallel(module, params[0].device_mesh.get_group())
    return DataParallel(module.process_group if is_ddp else None, ddp=module if is_ddp else None)


def privacy_fingerprint(settings, **more) -> dict:
    """Everything that must agree between ranks: the privacy settings (a dataclass) plus
    ``more`` (accountant, secure mode, data set size, parameter shapes...), as plain values."""
    fields = dataclasses.asdict(settings)
    fields.update(more)
    return fields


class DataParallel:
    """The collective operations of data-parallel DP-SGD on one process group.

    Args:
        group: the process group (``None``: the default one).
        ddp: the ``DistributedDataParallel`` model being trained, if it is one.

    Attributes:
        rank, world_size: this process's place in ``group``.
    """

    sharded = False  #: parameters sharded with FSDP2 (``ShardedDataParallel``)

    def __init__(self, group=None, ddp: DistributedDataParallel | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        self._ddp = ddp
        self._hook: PrivateCommHook | None = None

    # -- set-up (once, in make_private) ----------------------------------------------------
    def agree(self, fingerprint: dict) -> None:
        """Refuse, on every rank, a job whose ranks disagree on the privacy configuration.

        Every rank sends its fingerprint to every other (one ``all_gather_object``), so all of
        them raise the same error instead of some waiting forever for a collective call.

        Raises:
            ConfigError: names the first field that differs, its value on rank 0 and on the
                first rank that differs.
        """
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, fingerprint, group=self.group)
        reference = everyone[0]
        for rank, theirs in enumerate(everyone):
            for name in sorted(set(reference) | set(theirs)):
                mine, other = reference.get(name), theirs.get(name)
                if mine != other:
                    raise ConfigError(
                        f"every rank must call make_private with the same privacy configuration; "
                        f"got {name}={mine!r} on rank 0 and {name}={other!r} on rank {rank}. "
                        f"Pass the same arguments, model and data set on every rank (derive them "
                        f"from the command line or rank 0, not from rank-local state).")

    def attach(self, module: nn.Module) -> None:
        """Make the ranks start from the same model, and keep DDP off the wire.

        A plain model gets rank 0's parameters and buffers (as ``DistributedDataParallel``
        does when it is built); a DDP model gets the no-communication hook of
        ``privgrad.distributed.ddp``.
        """
        if self._ddp is not None:
            self._hook = prepare_ddp(self._ddp)
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=self._src, group=self.group)

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's sampling seed, so that every rank draws the same global Poisson sample
        (sent as a Python object: NCCL groups take care of the device)."""
        box = [int(seed)]
        dist.broadcast_object_list(box, src=self._src, group=self.group)
        return box[0]

    def noise_seed(self, seed: int) -> int:
        """The seed of this rank's noise source: its own (only rank 0's noise is released)."""
        return seed

    def shard(self, sampler) -> ShardedSampler:
        """This rank's share of ``sampler``'s global samples (index ``i`` goes to rank
        ``i % world_size``)."""
        return ShardedSampler(sampler, self.rank, self.world_size)

    # -- every step --------------------------------------------------------------------------
    def reduce_sums(self, sums: dict, params: list) -> dict:
        """Add the ranks' clipped sums up on rank 0, one ``reduce`` per dtype and device.

        Args:
            sums: this rank's clipped sum per parameter (a parameter no local example reached
                may be missing: it counts as zero), and named extra totals (adaptive clipping's
                count, keyed by a string, on every rank).
            params: the privatised parameters, in the same order on every rank (``agree``
                checked their shapes).

        Returns:
            On rank 0 the total for every parameter; on the other ranks an empty dict (they
            receive rank 0's release from
            [`broadcast_release()`][privgrad.distributed.context.DataParallel.broadcast_release]
            instead).

        Privacy:
            Only clipped sums are sent, once per logical step. A rank sees at most partial sums
            of other ranks' clipped sums (inside the reduction), never raw gradients.
        """
        full = {p: sums[p] if p in sums else
                torch.zeros_like(p, dtype=accumulation_dtype(p.dtype))
                for p in params}
        full.update({k: v for k, v in sums.items() if isinstance(k, str)})  # adaptive's count
        if self.world_size == 1:
            return full
        total = self._collective(full, lambda flat: dist.reduce(
            flat, dst=self._src, op=dist.ReduceOp.SUM, group=self.group))
        return total if self.rank == 0 else {}

    def noise_share(self, noise_std: float) -> float:
        """The noise std this rank draws: all of it on rank 0, none elsewhere.

        Privacy:
            Rank 0 alone releases: it adds one draw of ``N(0, noise_std^2)`` from its noise
            source (reproducible or secure) to the *total* clipped sum, exactly the
            single-process computation, and nothing is added to the release afterwards (secure
            mode's lattice rounding stays intact). The other ranks' output is discarded by
            [`broadcast_release()`][privgrad.distributed.context.DataParallel.broadcast_release], so
            their generators do not matter.
        """
        return noise_std if self.rank == 0 else 0.0

    def broadcast_release(self, grads: dict) -> dict:
        """Every rank gets rank 0's private gradient (one ``broadcast`` per dtype and device).

        Privacy:
            What is sent is the release itself (noised, public to every rank anyway); every
            rank then applies the identical update, so the models stay equal.
        """
        if self.world_size == 1:
            return grads
        return self._collective(grads, lambda flat: dist.broadcast(
            flat, src=self._src, group=self.group))

    def _collective(self, tensors: dict, op) -> dict:
        """Run ``op`` in place on one flat buffer per (dtype, device) of ``tensors``; return
        views of the results, keyed and ordered like ``tensors``."""
        groups = defaultdict(list)
        for key, tensor in tensors.items():
            groups[(tensor.dtype, tensor.device)].append(key)
        out = {}
        for keys in groups.values():
            flat = torch.cat([tensors[k].reshape(-1) for k in keys])
            op(flat)
            for k, part in zip(keys, flat.split([tensors[k].numel() for k in keys])):
                out[k] = part.view_as(tensors[k])
        return {k: out[k] for k in tensors}

    def detach(self) -> None:
        """Give DDP its gradient all-reduce back (nothing to undo for a plain model)."""
        if self._hook is not None:
            self._hook.private = False
