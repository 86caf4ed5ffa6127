"""The Gaussian noise of DP-SGD, drawn once per logical step for each trainable parameter.

On the CPU, PyTorch's ``normal_`` is limited by its Mersenne Twister, which produces one stream
of numbers on one core (about 250 million samples a second): for a model with millions of
parameters the noise costs more than the rest of the step.
[`TorchGaussian`][privgrad.privatize.noise.TorchGaussian] therefore draws a large CPU tensor as
``STREAMS`` contiguous pieces, each from its own Mersenne Twister, on as many cores as PyTorch may
use. Each piece is the same ``normal_`` kernel; only the number of streams changes, and it is fixed,
so the noise does not depend on the number of cores.

Each call gives every stream a fresh full state: 624 words drawn from the source's generator. So
no stream state is ever reused (seeding a Twister with an integer would give only 2**32 possible
streams, and two steps with the same stream would cancel each other's noise).

Whose generator: a source made with ``seed=`` owns one generator per device, seeded from that
seed, and its [`TorchGaussian.state_dict()`][privgrad.privatize.noise.TorchGaussian.state_dict]
holds their states. The privacy engine makes its source so (the seed drawn at ``make_private``,
after ``torch.manual_seed``), so the noise does not move with the user's own use of PyTorch's random
stream (dropout, augmentation), and a resumed run always continues the noise where it stopped:
restarting it from the seed would repeat the first run's noise, which subtracting two releases
cancels. A source made without a seed draws from PyTorch's default generators (as a standalone
sampler).

Privacy:
    The default source is reproducible and *not* secure: floating-point Gaussian samplers leak
    through the low bits of their output (Mironov 2012), and PyTorch's generators are not
    cryptographic (the streams here are derived from the default generator's output). It
    assumes the Mersenne Twister's output is statistically indistinguishable from independent
    uniform draws, as every PyTorch sampler does. Use secure mode for a deployment that must
    resist an attacker who sees the exact floating-point updates.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

STREAMS = 4  #: pieces a large CPU tensor is drawn in (fixed: the noise is the same on any machine)
#: Elements from which a CPU tensor is drawn in pieces. Below about a million the pieces are no
#: faster than one ``normal_`` (thread hand-off, fresh generator states, and the intra-op threads
#: still spinning after the backward pass): measured interleaved in a training step on 2 cores,
#: 0.54M noise draws took 2.4 ms in pieces against 2.0 ms in one call; 1.7M took 4.9 against 8.3.
#: The spinning is libgomp's ``GOMP_SPINCOUNT`` (300,000 rounds by default); with 10,000, set
#: before Python starts, the pieces win from about 0.5M (see docs/performance.md). The threshold
#: stays fixed here, not read from the environment: it decides which tensors are drawn in pieces,
#: and so the noise values for a given seed.
PARALLEL_MIN = 1 << 20

# PyTorch's CPU generator state (CPUGeneratorImplState): a uint64 initial seed, int32 ``left``,
# int32 ``seeded``, uint64 ``next``, then the 624 state words as uint64, ... (5056 bytes).
_STATE_BYTES, _LEFT, _NEXT, _WORDS, _N = 5056, 8, 16, 24, 624


class TorchGaussian:
    """Noise from PyTorch's generators on the tensor's device (not secure).

    Args:
        parallel_min: CPU tensors with at least this many elements are drawn in
            ``STREAMS`` pieces on several cores (smaller ones in one ``normal_`` call).
    """

    secure = False
    #: ``noisy_gradients()`` may draw the noise (``sample_many()``) into
    #: the gradient buffers and add the (possibly sparse) clipped sums to it; a source without
    #: this adds the noise to the sum itself (``add_noise``).
    fuses_sums = True

    def __init__(self, parallel_min: int = PARALLEL_MIN, *, seed: int | None = None):
        self.parallel_min = parallel_min
        self.seed = seed
        # this source's own generators, per device (only with a seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        # sample_many's last CPU buffer per (dtype, device), reused once nothing else holds it
        self._kept: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._plan: tuple[tuple, list] | None = None  # sample_many's last layout and its groups

    def seeded(self, seed: int) -> TorchGaussian:
        """This source for one run: its own generators, seeded from ``seed``."""
        return TorchGaussian(self.parallel_min, seed=seed)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This source's generator for ``device`` (``None``: PyTorch's default one)."""
        if self.seed is None:
            return None
        device = _canonical(device)
        g = self._generators.get(device)
        if g is None:  # one independent stream per device, from the seed and the device
            words = np.random.SeedSequence([self.seed, *_device_key(device)]).generate_state(2)
            g = torch.Generator(device=device)
            g.manual_seed(int(words[0]) << 32 | int(words[1]))
            self._generators[device] = g
        return g

    def state_dict(self) -> dict:
        """The seed and every generator's state (what a resumed run needs to continue)."""
        return {"seed": self.seed,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from [`state_dict()`][privgrad.privatize.noise.TorchGaussian.state_dict]'s
        output (generators of absent devices are made from the seed when first used, as in the saved
        run)."""
        self.seed = None if state["seed"] is None else int(state["seed"])
        self._generators = {}
        for name, saved in state["generators"].items():
            device = _canonical(torch.device(name))
            if device.type != "cpu" and not _device_available(device):
                continue  # resumed without that device: its draws start from the seed
            g = torch.Generator(device=device)
            g.set_state(saved)
            self._generators[device] = g

    def sample(self, like: torch.Tensor, std: float) -> torch.Tensor:
        """A new tensor shaped like ``like`` (same dtype and device) of ``N(0, std^2)`` draws."""
        return self.fill(torch.empty_like(like, memory_format=torch.contiguous_format), std)

    def fill(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """Overwrite the contiguous tensor ``out`` with ``N(0, std^2)`` draws and return it;
        every draw of this source goes through here."""
        if std <= 0:
            return out.zero_()
        g = self.generator(out.device)
        if (out.device.type != "cpu" or out.numel() < self.parallel_min
                or not out.dtype.is_floating_point or not _state_layout_known()):
            return out.normal_(0.0, std, generator=g)
        _draw_in_streams(out.view(-1), std, g)
        return out

    def sample_many(self, likes: list[tuple[torch.Size, torch.dtype, torch.device]],
                    std: float) -> list[torch.Tensor]:
        """New tensors of ``N(0, std^2)`` draws, one per ``(shape, dtype, device)``.

        Tensors of one dtype and device are views into one buffer filled by a single draw, so
        that many small parameters are drawn together (on several cores on the CPU) instead of
        one short ``normal_`` call each.

        On the CPU the buffer is kept and refilled by the next call once no tensor anywhere
        still uses its memory (every view handed out is gone: ``optimizer.zero_grad()`` set the
        gradients to ``None`` and nobody kept one). A fresh buffer of a model's size costs a
        page fault per 4 KiB on first touch (the C library returns such blocks to the system
        when they are freed): 0.5-1 ms a step for a 0.5M-parameter MLP, a quarter of its noise.
        Where a view is still held, the call takes a fresh buffer and the held one is never
        written again.
        """
        key = tuple(likes)
        if self._plan is None or self._plan[0] != key:  # a plan per layout, kept while it repeats
            self._plan = (key, _plan(likes))
        out: list[torch.Tensor | None] = [None] * len(likes)
        for dtype, device, members, sizes, shapes in self._plan[1]:
            flat = self.fill(self._buffer(sum(sizes), dtype, device), std)
            for i, piece, shape in zip(members, flat.split_with_sizes(sizes), shapes):
                out[i] = piece.view(shape)
        return out

    def _buffer(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat ``n``-element buffer: the kept one if nothing else uses it, else a new one
        (kept in its place on the CPU)."""
        return reused(self._kept, n, dtype, device)

    def add_noise(self, total: torch.Tensor, std: float) -> torch.Tensor:
        """``total + N(0, std^2)`` as a new tensor (the noise is drawn first, then added).

        Every noise source has this method: the engine hands it the clipped sum, so that a
        secure source can control how the addition is rounded
        (``SecureGaussian``).
        """
        return self.sample(total, std).add_(total)


def reused(kept: dict, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat ``n``-element buffer for a release: ``kept[(dtype, device)]`` if nothing else uses
    its memory any more, else a new one, which is then kept in its place (on the CPU; CUDA's
    caching allocator already reuses its blocks). A model-sized block taken fresh every step
    costs a page fault per 4 KiB on the CPU (see ``TorchGaussian.sample_many()``)."""
    key = (dtype, device)
    buffer = kept.pop(key, None)
    if buffer is None or buffer.numel() != n or not _sole_user(buffer):
        buffer = torch.empty(n, dtype=dtype, device=device)
    if device.type == "cpu" and _use_count_baseline() is not None:
        kept[key] = buffer
    return buffer


def _plan(likes: list[tuple[torch.Size, torch.dtype, torch.device]]) -> list[tuple]:
    """``sample_many()``'s groups: ``(dtype, device, members, sizes, shapes)`` for each dtype and
    device, in first-seen order (the order in which their buffers are filled)."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, (_, dtype, device) in enumerate(likes):
        groups.setdefault((dtype, torch.device(device)), []).append(i)
    return [(dtype, device, members, [math.prod(likes[i][0]) for i in members],
             [likes[i][0] for i in members]) for (dtype, device), members in groups.items()]


def _draw_in_streams(flat: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """Fill ``flat`` with ``N(0, std^2)``: piece ``k`` from stream ``k``, freshly seeded from
    ``generator`` (PyTorch's default CPU generator if ``None``)."""
    words = torch.randint(0, 2**32, (STREAMS, _N), dtype=torch.int64,
                          generator=generator).numpy()
    streams = []
    for k in range(STREAMS):
        g = torch.Generator()
        g.set_state(_twister_state(words[k]))
        streams.append(g)
    pieces = flat.chunk(STREAMS)
    draw = [functools.partial(piece.normal_, 0.0, std, generator=g)
            for piece, g in zip(pieces, streams)]
    workers = min(STREAMS, torch.get_num_threads(), os.cpu_count() or 1)
    if workers < 2:
        for d in draw:
            d()
        return
    for f in [_executor(workers).submit(d) for d in draw]:
        f.result()


def _twister_state(words: np.ndarray) -> torch.Tensor:
    """A CPU generator state whose Mersenne Twister holds ``words`` (624 values < 2**32) and
    regenerates them before its first output."""
    state = _template().clone()
    raw = state.numpy()
    raw[_LEFT:_LEFT + 8] = np.array([1, 1], dtype=np.int32).view(np.uint8)  # left, seeded
    raw[_NEXT:_NEXT + 8] = 0
    raw[_WORDS:_WORDS + 8 * _N] = words.astype(np.uint64).view(np.uint8)
    return state


def _canonical(device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: one generator per physical device."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "current_device"):
            return torch.device(device.type, module.current_device())
    return device


def _device_key(device: torch.device) -> tuple[int, int]:
    kinds = {"cpu": 0, "cuda": 1, "mps": 2, "xpu": 3}
    return kinds.get(device.type, 4 + sum(map(ord, device.type))), device.index or 0


def _device_available(device: torch.device) -> bool:
    module = getattr(torch, device.type, None)
    try:
        return bool(module is not None and module.is_available()
                    and (device.index or 0) < module.device_count())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _template() -> torch.Tensor:
    return torch.Generator().get_state()


@functools.cache
def _state_layout_known() -> bool:
    """Whether this PyTorch's generator state has the layout ``_twister_state()`` writes
    (checked on a seeded generator: its seed, counters and first two Twister words)."""
    seed = 0x2545F491
    raw = torch.Generator().manual_seed(seed).get_state().numpy()
    if raw.shape != (_STATE_BYTES,):
        return False
    head = raw[:_WORDS].view(np.uint8)
    initial, = np.frombuffer(head[:8].tobytes(), dtype=np.uint64)
    left, seeded = np.frombuffer(head[_LEFT:_LEFT + 8].tobytes(), dtype=np.int32)
    next_, = np.frombuffer(head[_NEXT:_NEXT + 8].tobytes(), dtype=np.uint64)
    w0, w1 = np.frombuffer(raw[_WORDS:_WORDS + 16].tobytes(), dtype=np.uint64).tolist()
    return (initial == seed and left == 1 and seeded == 1 and next_ == 0 and w0 == seed
            and w1 == (1812433253 * (seed ^ (seed >> 30)) + 1) & 0xFFFFFFFF)


def _storage_users(t: torch.Tensor) -> int:
    """How many tensors (views included) use ``t``'s memory, plus a fixed offset."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


@functools.cache
def _use_count_baseline() -> int | None:
    """``_storage_users()`` of a tensor nothing else uses, if this PyTorch counts views the
    way ``_sole_user()`` relies on (checked once); ``None`` turns buffer reuse off."""
    if not hasattr(torch._C, "_storage_Use_Count"):
        return None
    try:
        t = torch.empty(4)
        alone = _storage_users(t)
        view = t[1:]
        with_view = _storage_users(t)
        del view
        after = _storage_users(t)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return alone if with_view == alone + 1 and after == alone else None


def _sole_user(t: torch.Tensor) -> bool:
    """Whether no tensor but ``t`` itself uses its memory (no view, no other holder)."""
    baseline = _use_count_baseline()
    return baseline is not None and _storage_users(t) == baseline


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    """A thread pool of ``workers`` threads for this process (``normal_`` releases the GIL)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != workers:
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)
        _POOL = (os.getpid(), workers,
                 ThreadPoolExecutor(workers, thread_name_prefix="privgrad-noise"))
    return _POOL[2]
