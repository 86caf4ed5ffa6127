"""The release of a correlated-noise step: the clipped sums plus ``std * w_t``, where ``w_t`` is
row ``t`` of ``C^{-1} z`` from a streaming generator (``privgrad.mechanisms``), normalised and
written per parameter.

The engine hands over one generator per (dtype, device) of the privatised parameters (each over
their concatenation) and a noise source for the independent draws ``z``; this module knows
nothing of strategies, samplers or accounting. Rows the run skips (a batch drawn and never
stepped, e.g. prefetched by a loader left early) are drawn and thrown away, so that every
release uses the row of the sampler step that drew its batch.

Privacy:
    The correlated noise is ``sigma * C * w_t`` with ``w = C^{-1} z`` exactly when the ``z`` are
    independent standard normal draws, each used once: they come from the run's noise source
    (its own generator, or the operating system in secure mode), and a row is never drawn
    twice (a release for a row already used is refused). Secure mode: the ``z`` are drawn from
    the CSPRNG (``SecureGaussian.standard_normal``), the noise is formed in float64 and the
    release is rounded to the lattice of ``privgrad.privatize.secure`` (post-processing). Unlike
    secure mode's independent noise, that rounding is applied to the float64 sum, not computed
    exactly from the draws, so its hardening against floating-point attacks is up to float64's
    rounding (about ``2**-40`` of the lattice spacing), not exact; docs/reliability.md.
"""

from __future__ import annotations

import torch
from torch import nn

from privgrad.errors import PrivacyStateError
from privgrad.privatize.noise import reused
from privgrad.privatize.secure import lattice_spacing
from privgrad.privatize.step import accumulation_dtype

__all__ = ["CorrelatedRelease", "layout"]


def layout(params: list[nn.Parameter], secure: bool) -> dict[tuple, list[nn.Parameter]]:
    """The parameters grouped by the (dtype, device) their noise is formed in (float64 in secure
    mode), in first-seen order: one generator per group."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        dtype = torch.float64 if secure else accumulation_dtype(p.dtype)
        groups.setdefault((dtype, p.device), []).append(p)
    return groups


class CorrelatedRelease:
    """Forms the released gradients of a correlated-noise step.

    Args:
        streams: ``{(dtype, device): generator}`` as ``layout()`` groups the parameters; each
            generator has ``step(z)`` and ``step_index`` (``BandedNoise``, ``BufferedNoise``).
        groups: ``layout(params, secure)``.
        source: the run's noise source; its ``standard_normal(like)`` (secure) or
            ``sample_many`` (reproducible) gives the draws ``z``.
    """

    def __init__(self, streams: dict, groups: dict, source):
        self.streams, self.groups, self.source = streams, groups, source
        self.secure = bool(source.secure)
        self._kept: dict = {}  # each group's output buffer, reused once no gradient holds it

    @property
    def row(self) -> int:
        """The next row the generators will produce."""
        return next(iter(self.streams.values())).step_index

    def _draw(self, stream, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.secure:
            return self.source.standard_normal(torch.empty(n, dtype=dtype, device=device))
        return self.source.sample_many([((n,), dtype, device)], 1.0)[0]

    def _advance(self, row: int) -> None:
        if row < self.row:
            raise PrivacyStateError(
                f"each noise row is used once; got a release for row {row} after row "
                f"{self.row - 1}. The sampler's steps must increase from release to release. "
                f"Nothing was released.")
        for (dtype, device), stream in self.streams.items():
            n = sum(p.numel() for p in self.groups[(dtype, device)])
            while stream.step_index < row:  # rows of batches never stepped: drawn, unused
                stream.step(self._draw(stream, n, dtype, device))

    def release(self, sums: dict, *, row: int, noise_std: float,
                normaliser: float) -> dict[nn.Parameter, torch.Tensor]:
        """``(sum + noise_std * w_row) / normaliser`` for every parameter, in its own dtype.

        ``noise_std == 0`` (the ranks other than 0 in data-parallel training, whose output is
        discarded) forms no noise and leaves the generators where they are."""
        out = {}
        if noise_std > 0:
            self._advance(row)
        # one pass over each buffer: the noise scaled straight to std / normaliser and the sums
        # added with weight 1 / normaliser, except in secure mode, which rounds the sum first
        late = self.secure and noise_std > 0
        scale, weight = (noise_std, 1.0) if late else (noise_std / normaliser, 1.0 / normaliser)
        for (dtype, device), params in self.groups.items():
            sizes = [p.numel() for p in params]
            if noise_std > 0:
                stream = self.streams[(dtype, device)]
                # the scale folded into the generator's own pass over its state
                n = sum(sizes)
                w = stream.step(self._draw(stream, n, dtype, device), scale=scale,
                                out=reused(self._kept, n, dtype, device))
                noise = w.to(dtype).split(sizes)
            else:
                noise = [torch.zeros(n, dtype=dtype, device=device) for n in sizes]
            totals = [part.view(p.shape) for p, part in zip(params, noise)]
            dense_totals, dense_sums = [], []
            for p, total in zip(params, totals):
                s = sums.get(p)
                if s is None:
                    continue
                if s.is_sparse:  # only its rows (an embedding's tokens), never densified
                    total.add_(s, alpha=weight)
                else:
                    dense_totals.append(total)
                    dense_sums.append(s)
            if dense_totals:  # one grouped add for the group's parameters
                torch._foreach_add_(dense_totals, dense_sums, alpha=weight)
            for p, total in zip(params, totals):
                if late:
                    total = _snap(total, noise_std)
                    if normaliser != 1.0:
                        total = total.div_(normaliser)
                out[p] = total if total.dtype == p.dtype else total.to(p.dtype)
        return out

    def state_dict(self) -> dict:
        """Every generator's state, keyed by ``"dtype device"``."""
        return {_key(k): s.state_dict() for k, s in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s output (the generators check their own states)."""
        for k, s in self.streams.items():
            s.load_state_dict(state[_key(k)])

    def check_state(self, state: object) -> str | None:
        """Why ``state`` cannot continue these generators (``None`` if it can)."""
        if not isinstance(state, dict) or set(state) != {_key(k) for k in self.streams}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            return f"noise generators {got} saved, {sorted(_key(k) for k in self.streams)} here"
        return None


def _key(key: tuple) -> str:
    dtype, device = key
    return f"{str(dtype).removeprefix('torch.')} {device}"


def _snap(total: torch.Tensor, std: float) -> torch.Tensor:
    """``total`` rounded to secure mode's lattice for noise of ``std`` (exact: a power of two)."""
    spacing = lattice_spacing(std)
    return total.div_(spacing).round_().mul_(spacing)
