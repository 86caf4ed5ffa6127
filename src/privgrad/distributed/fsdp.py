"""Sharded private training: a model whose blocks are wrapped by FSDP2's ``fully_shard``.

FSDP2 keeps each parameter as a ``DTensor`` sharded on dimension 0 across the ranks and gathers
a block's parameters only while the block runs. privgrad's per-layer capture still works: a
layer inside a ``fully_shard`` block runs (forward and backward) on the gathered, full-shape
weight, and its capture (inputs, output gradients) is the rank's own examples. What changes is
what happens to the clipped sums (``ShardedDataParallel``, a
[`DataParallel`][privgrad.distributed.context.DataParallel] whose steps are replaced):

1. **during backward**, per layer: the capture (ghost norms need no per-sample gradient); the
   parameter gradients autograd would form are skipped (the rules give the input gradient; a
   norm layer's, which autograd forms, is dropped by a hook on the gathered parameter), so
   FSDP's own reduce-scatter has nothing to send;
2. **at the end of backward** (the clip factors need every layer's norm): one parameter at a
   time, its full-shape clipped sum over the rank's examples, ``reduce_scatter`` (sum) to the
   ranks' ``Shard(0)`` pieces, freed; a rank keeps only its shard (``shard_sums``);
3. **at the step**: every rank adds ``N(0, (sigma C)^2)`` to *its own shard*, from a noise
   source seeded from rank 0's seed, the rank and the world size, divides by the normaliser
   and writes ``p.grad = DTensor.from_local(...)`` with the parameter's placements.

Privacy:
    Each coordinate of the summed clipped gradient has exactly one owner (Shard(0) pieces are
    disjoint), which adds one draw of the full ``N(0, (sigma C)^2)``: the release is the
    single-process release, ``sum_b clip(g_b) + N(0, (sigma C)^2 I)`` over the global Poisson
    batch, divided by the same normaliser, held as shards. The ranks' noise generators are
    independent (their seeds differ by rank), never alike (identical seeds on two shards would
    give two coordinates the same noise). Only clipped sums go on the wire (reduce-scatter); no
    raw gradient leaves a rank except in the self-check's pass, when FSDP reduce-scatters
    autograd's gradient (inside the job's trust boundary, overwritten before any step). Same
    trust model as ``privgrad.distributed.context``: every rank is inside the boundary.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor, Shard

from privgrad import _validate
from privgrad._precision import accumulation_dtype
from privgrad.distributed.context import DataParallel
from privgrad.engine.selfcheck import mismatched
from privgrad.errors import ConfigError, PrivacyStateError

__all__ = ["SHARDED_RULES", "ShardedDataParallel", "sharded_model"]

_HALF = (torch.float16, torch.bfloat16)


def _reduce_scatter(output: torch.Tensor, input: torch.Tensor, **kwargs) -> None:
    """``dist.reduce_scatter_single`` (torch 2.13's name; ``reduce_scatter_tensor`` warns)."""
    single = getattr(dist, "reduce_scatter_single", None)
    if single is not None:
        single(output=output, input=input, **kwargs)
    else:
        dist.reduce_scatter_tensor(output, input, **kwargs)


#: Rules that read only a layer's inputs, output gradients and parameter *shapes* once the
#: backward pass ends, when FSDP has freed the gathered weights (tested on sharded models).
SHARDED_RULES = ("LinearRule", "TransposedLinearRule", "LayerNormRule", "RMSNormRule")


def sharded_model(module: nn.Module, params: list, registry) -> bool:
    """Whether ``module`` is an FSDP2 model privgrad can train; refuse the layouts it cannot.

    Raises:
        ConfigError: FSDP1 (``FullyShardedDataParallel``) alone or mixed with FSDP2; sharded
            parameters without ``fully_shard`` (tensor parallelism); a trainable parameter
            outside every ``fully_shard`` block, sharded other than ``Shard(0)`` on one mesh
            dimension, or owned directly by a ``fully_shard`` module (its rule would see the
            shard, not the whole weight); a layer whose rule is not one of ``SHARDED_RULES``.
    """
    modules = dict(module.named_modules())
    old = [p or "<root>" for p, m in modules.items() if isinstance(m, FullyShardedDataParallel)]
    new = [p or "<root>" for p, m in modules.items() if isinstance(m, FSDPModule)]
    if old:
        raise _validate.fail(
            "privgrad shards with FSDP2 (torch.distributed.fsdp.fully_shard) only" + (
                ", not a model mixing FSDP1 and FSDP2" if new else ""),
            "FullyShardedDataParallel modules", old[:3],
            "Build the model with fully_shard(block) for each block and fully_shard(model); "
            "FSDP1 flattens parameters, so no per-layer rule can see a layer's weight.")
    dtensors = [p for p in params if isinstance(p, DTensor)]
    if not new:
        if dtensors:
            raise _validate.fail(
                "sharded (DTensor) parameters must come from fully_shard", "sharded parameters",
                len(dtensors), "Shard with torch.distributed.fsdp.fully_shard (tensor "
                "parallelism is not supported), or train with DistributedDataParallel.")
        return False
    names = {p: n for n, p in module.named_parameters()}
    plain = [names.get(p, "?") for p in params if not isinstance(p, DTensor)]
    if plain:
        raise _validate.fail(
            "every trainable parameter of an FSDP2 model must be sharded", "unsharded",
            plain[:3], "Call fully_shard(model) on the root as well (FSDP2's usual recipe).")
    odd = [names.get(p, "?") for p in dtensors
           if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)]
    if odd:
        raise _validate.fail(
            "sharded parameters must be Shard(0) on a 1-D device mesh", "parameters", odd[:3],
            "Use fully_shard with a 1-D mesh (the default); HSDP and tensor parallelism are not "
            "supported.")
    trainable = set(params)
    for path, m in modules.items():
        own = [n for n, p in m.named_parameters(recurse=False) if p in trainable]
        if not own:
            continue
        if isinstance(m, FSDPModule):
            raise _validate.fail(
                "a layer privgrad clips must run inside a fully_shard block, not be one (its "
                "rule would see its parameters sharded across the call)",
                "fully_shard on", f"{path or '<root>'} ({type(m).__name__})",
                f"Call fully_shard on the block that contains {path or 'it'} (e.g. "
                f"fully_shard(model) for the root), not on the layer itself.")
        rule = registry.lookup(m)
        if type(rule).__name__ not in SHARDED_RULES:
            raise _validate.fail(
                f"under FSDP2 a trainable layer must be served by one of {SHARDED_RULES}",
                f"the rule of {path}", type(rule).__name__,
                f"Freeze {path} (requires_grad_(False)), e.g. train LoRA adapters on a frozen "
                f"base, or train with DistributedDataParallel.")
    return True


class ShardedDataParallel(DataParallel):
    """The collective steps of private training on an FSDP2 model (see the module docstring).

    Args:
        module: the model (its ``fully_shard`` blocks already built).
        group: the process group of the parameters' device mesh.
    """

    sharded = True

    def __init__(self, module: nn.Module, group=None):
        super().__init__(group)
        #: (module, parameter name) -> the sharded parameter: captures record the gathered
        #: parameter of the call, the engine keys everything by the optimizer's sharded one
        self._owners: dict[tuple[nn.Module, str], nn.Parameter] = {}
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    self._owners[(m, name)] = p
        self._order = list(module.parameters())  # the order of the collective calls
        self._half = False  # this backward pass ran on half-precision gathered parameters
        self.keep_raw = True  # set by the engine before each forward pass: a checked pass
        self._dropping: dict = {}  # gathered parameter -> its gradient hook (see _drop_raw)

    def layout(self) -> dict:
        """What an engine state saved on this rank belongs to (``privgrad.run_state``)."""
        return {"rank": self.rank, "world_size": self.world_size}

    def agree(self, fingerprint: dict) -> None:
        """The ranks' check, then what sharded training does not support (yet): adaptive
        clipping, correlated noise, user-level privacy (refused on every rank alike)."""
        super().agree(fingerprint)
        for name, allowed in (("clipping", ("flat", "per_layer", "automatic")),
                              ("mechanism", (None,)), ("privacy_unit", ("example",))):
            if fingerprint.get(name, allowed[0]) not in allowed:
                raise _validate.fail(
                    f"private training of an FSDP2 model supports {name} in {allowed}", name,
                    fingerprint[name], "Use the default, or train with DistributedDataParallel.")

    def attach(self, module: nn.Module) -> None:
        """Nothing to synchronise: each coordinate has one owner, which keeps its own value
        (FSDP2 does not broadcast either: initialise every rank alike, or load a checkpoint)."""

    def noise_seed(self, seed: int) -> int:
        """This rank's noise seed: rank 0's seed, the rank and the world size, mixed
        (``numpy.random.SeedSequence``), so that the shards' noise is independent across ranks
        and reproducible for a seed.

        Privacy:
            Two ranks never share a seed; a seed shared by every rank (the usual recipe) would
            give the same noise to coordinates on different shards.
        """
        words = np.random.SeedSequence([self.broadcast_seed(seed), self.rank,
                                        self.world_size]).generate_state(2)
        return int(words[0]) << 30 | int(words[1]) >> 2

    def own(self, captures: list) -> list:
        """Key each capture by the sharded parameters (the call recorded the gathered ones);
        note whether the pass computed in half precision (FSDP2's ``MixedPrecisionPolicy``)."""
        self._half = any(isinstance(x, torch.Tensor) and x.dtype in _HALF
                         for c in captures for x in c.args)
        for c in captures:
            for gathered in c.params:
                if gathered not in self._dropping and not isinstance(gathered, DTensor):
                    self._dropping[gathered] = gathered.register_post_accumulate_grad_hook(
                        self._drop_raw)
            if c.params:
                c.params = tuple(self._owner(c.module, n) for n in c.names)
        return captures

    def _drop_raw(self, gathered: torch.Tensor) -> None:
        """A gathered parameter's autograd gradient (a layer whose rule forms no input-only
        backward, e.g. a norm layer) is dropped before FSDP2's reduce-scatter would send it;
        kept on the self-check's passes (``keep_raw``), which compare against it."""
        if not self.keep_raw:
            gathered.grad = None

    def _owner(self, module: nn.Module, name: str) -> nn.Parameter:
        child, _, leaf = name.rpartition(".")
        return self._owners[(module.get_submodule(child) if child else module, leaf)]

    # -- the backward pass and the step ----------------------------------------------------
    def shard_sums(self, batch, weights, keep, params: set) -> dict:
        """This rank's shard of the clipped sums summed over the ranks: for each privatised
        parameter, in the model's order (the same on every rank), its full-shape sum over this
        rank's examples, reduce-scattered, then dropped."""
        out = {}
        for p in (p for p in self._order if p in params):
            s = batch.weighted_sums(weights, keep, only=p).get(p) if batch.batch_size else None
            acc = accumulation_dtype(p.dtype)
            s = torch.zeros(p.shape, dtype=acc, device=p.device) if s is None else s.to(acc)
            out[p] = self._scatter(s.to_dense() if s.is_sparse else s, p)
        return out

    def _scatter(self, full: torch.Tensor, p: DTensor) -> torch.Tensor:
        """``reduce_scatter`` (sum) of ``full`` into this rank's ``Shard(0)`` piece of ``p``
        (``torch.chunk``'s layout: ``ceil(rows / world_size)`` rows a rank, the last ones
        short or empty)."""
        local = p.to_local()
        rows = full.shape[0] if full.dim() else 1
        per = -(-rows // self.world_size)
        flat = full.reshape(rows, -1)
        if per * self.world_size != rows:
            flat = torch.cat([flat, flat.new_zeros(per * self.world_size - rows, flat.shape[1])])
        piece = flat.new_empty(per, flat.shape[1])
        _reduce_scatter(piece, flat.contiguous(), op=dist.ReduceOp.SUM, group=self.group)
        return piece[:local.shape[0]].reshape(local.shape)

    def reduce_sums(self, sums: dict, params: list) -> dict:
        """Already reduced (``shard_sums``): a parameter no pass reached gets zeros."""
        if any(isinstance(k, str) for k in sums):
            raise ConfigError("adaptive clipping is not supported with FSDP2; got its count "
                              "among the sums. Use clipping='flat'.")
        return {p: sums[p] if p in sums else torch.zeros_like(
            p.to_local(), dtype=accumulation_dtype(p.dtype)) for p in params}

    def noise_share(self, noise_std: float) -> float:
        """Every rank draws the full noise, for its own shard's coordinates only."""
        return noise_std

    def release(self, params: list, sums: dict, *, noise_std: float, normaliser: float,
                noise) -> dict:
        """``(shard + N(0, noise_std^2)) / normaliser`` per parameter, as a DTensor with the
        parameter's placements (this rank's source: see ``noise_seed``)."""
        grads = {}
        for p in params:
            g = noise.add_noise(sums[p], noise_std)
            if normaliser != 1.0:
                g.div_(normaliser)
            grads[p] = DTensor.from_local(g.to(p.dtype), p.device_mesh, p.placements,
                                          run_check=False, shape=p.shape, stride=p.stride())
        return grads

    def detach(self) -> None:
        for handle in self._dropping.values():
            handle.remove()
        self._dropping = {}

    def broadcast_release(self, grads: dict) -> dict:
        """Nothing to send: each rank holds the release of its own shards."""
        return grads

    def chunks(self, local: int) -> int:
        """Physical batches every rank runs for a logical batch (virtual batches): the most any
        rank needs, so that the ranks' reduce-scatters pair up (one small ``all_reduce``)."""
        count = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
        return int(count.item())

    # -- the self-check on a sharded model -------------------------------------------------
    def check_sums(self, batch, params: list, names: dict, *, loss_scale: float = 1.0,
                   loose: bool = False) -> bool:
        """``privgrad.engine.selfcheck.check_sums`` across the ranks: the reduce-scattered sum of
        each rank's unclipped per-sample sums against FSDP's reduce-scattered autograd gradient
        (an average over the ranks: times ``world_size``), compared on the whole parameter (one
        ``all_reduce`` of the norms), so every rank reaches the same verdict.

        Raises:
            PrivacyStateError: on every rank, naming the parameters that do not add up.
        """
        loose = loose or self._half  # bf16 / fp16 parameters gathered: half-precision rounding
        ones = None
        if batch.batch_size:
            like = next(iter(batch.norms_sq.values()))
            ones = torch.full((batch.batch_size,), 1.0 / batch.scale, dtype=like.dtype,
                              device=like.device)
        norms = []
        for p in params:
            s = batch.weighted_sums(ones, only=p).get(p) if ones is not None else None
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            s = torch.zeros(p.shape, dtype=dtype, device=p.device) if s is None else s.to(dtype)
            mine = self._scatter(s.to_dense() if s.is_sparse else s, p)
            g = p.grad.to_local().to(dtype) * (self.world_size / loss_scale) \
                if p.grad is not None else torch.zeros_like(mine)
            norms.append(torch.stack([g.square().sum(), mine.square().sum(),
                                      (mine - g).square().sum()]))
        total = torch.cat([torch.stack(norms).reshape(-1).double(),
                           torch.tensor([float(batch.batch_size)], dtype=torch.float64)])
        dist.all_reduce(total, group=self.group)
        if total[-1] == 0 or not torch.isfinite(total).all():
            return False  # nothing to check (on any rank): again on the next pass
        rows = total[:-1].sqrt().reshape(-1, 3).tolist()
        wrong = mismatched([(p, d, max(g, s)) for p, (g, s, d) in zip(params, rows)], names, loose)
        if wrong:
            listed = ", ".join(f"{n} (relative difference {r:.2g})" for n, r in wrong[:6])
            raise PrivacyStateError(
                f"the per-sample gradients of every parameter must add up to autograd's "
                f"gradient (else their clipping does not bound what is released); got "
                f"{len(wrong)} sharded parameter(s) that do not: {listed}. Nothing was released. "
                f"See privgrad.engine.selfcheck for the usual causes.")
        return True
