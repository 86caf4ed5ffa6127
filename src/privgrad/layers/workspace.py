"""Work arrays a rule reuses from one step to the next.

On a CPU, PyTorch allocates with the C library's ``malloc``, which maps a block of more than
32 MiB straight from the operating system and unmaps it when it is freed: each use of such an
array faults every page in again (about 1.5 us a page on the benchmark VM). A recurrent
layer's gate arrays are that large at batch 256 (``(b, t, 4h)``: 64 MiB for the benchmark's
LSTM), and writing one fresh costs 30 ms where writing it again costs 5. A rule takes such
arrays through a ``Lease`` on the module's ``Workspace``; the engine gives them back
when the call's capture is released (after the step's clipped sums, when nothing reads them
any more), and the next call of the module writes into the same memory.

An array is only ever in the workspace while no lease holds it, so two calls of one module in
one forward pass get different arrays; a lease that is never given back (a forward pass nobody
backpropagates through) is simply freed. The workspace keeps at most one array per name, as
large as the largest call asked for, so a batch size that varies from step to step (Poisson
sampling) reuses it too.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

_SLACK = 1.125  # a grown array leaves room for slightly larger batches (Poisson sampling)


class Workspace:
    """The free arrays of one module, by ``(name, dtype, device)``."""

    def __init__(self):
        self._free: dict[tuple, torch.Tensor] = {}

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """The arrays one call of a module took from its ``Workspace``."""

    def __init__(self, workspace: Workspace):
        self._workspace = workspace
        self._taken: list[tuple[tuple, torch.Tensor]] = []

    def empty(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous ``shape`` array of ``like``'s dtype and device, reused
        if the workspace holds one free under ``name`` that is large enough."""
        key = (name, like.dtype, like.device)
        n = math.prod(shape)
        flat = self._workspace._free.pop(key, None)
        if flat is None or flat.numel() < n:
            flat = torch.empty(max(n, int(n * _SLACK) if flat is not None else n),
                               dtype=like.dtype, device=like.device)
        self._taken.append((key, flat))
        return flat[:n].view(shape)

    def give_back(self) -> None:
        """Return every array taken to the workspace. Only once nothing reads them any more:
        the next call writes into them."""
        free = self._workspace._free
        for key, flat in self._taken:
            held = free.get(key)
            if held is None or held.numel() < flat.numel():
                free[key] = flat
        self._taken = []


_WORKSPACES: weakref.WeakKeyDictionary[nn.Module, Workspace] = weakref.WeakKeyDictionary()


def workspace_of(module: nn.Module) -> Workspace:
    """The module's workspace (made on first use, freed with the module or ``drop()``)."""
    ws = _WORKSPACES.get(module)
    if ws is None:
        ws = _WORKSPACES[module] = Workspace()
    return ws


def drop(modules) -> None:
    """Free the workspaces of ``modules`` (the engine lets go of a model it detaches from;
    leases still out keep their arrays until they are dropped)."""
    for m in modules:
        _WORKSPACES.pop(m, None)
