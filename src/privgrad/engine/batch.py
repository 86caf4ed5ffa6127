"""Per-sample gradient information of one backward pass: norms first, weighted sums on demand.

For every recorded call the engine picks the cheaper *exact* method (the rule's cost model):

- **ghost**: the rule gives squared per-sample norms straight from the stored inputs and output
  gradients, and later the weighted sum ``sum_b w_b g_b`` as one contraction of the same tensors;
- **materialise**: the rule gives per-sample gradients ``(B, *shape)``; norms and the weighted sum
  are read off them.

A parameter used by several calls in one forward pass (tied weights, a module applied twice) has
one per-sample gradient, the sum over its uses, so its uses are materialised and summed before
the norm is taken.

A call to be materialised whose per-sample gradients are no larger than the tensors its capture
holds (a LayerNorm over a sequence: ``2d`` numbers per example against ``2Td``) is materialised
during the backward pass, as soon as its output gradients are in (``materialize_early()``),
and the capture lets go of its input and output gradient: they no longer wait for the end of the
pass. Same numbers, earlier; the peak memory of a private step drops by those tensors.

Modes (a performance setting: every mode gives the same update up to rounding):
``"auto"`` (cost model), ``"ghost"`` (ghost wherever a rule has one), ``"materialize"``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from privgrad._precision import accumulation_dtype
from privgrad.engine.groups import Units, by_unit
from privgrad.errors import PrivacyStateError
from privgrad.layers import Capture, speed_hooks

MODES = ("auto", "ghost", "materialize")


_HALF = (torch.float16, torch.bfloat16)


def materialize_early(capture: Capture, mode: str) -> bool:
    """Whether to form ``capture``'s per-sample gradients as soon as its output gradients are
    in: its rule allows it, the method is materialising, no tensor is in half precision (AMP
    converts and unscales at the end of the pass), and the per-sample gradients are no larger
    than the input and output gradients they replace: memory never grows at any moment of the
    pass, and at its end (where all three would otherwise coexist) it drops by those tensors."""
    if (not speed_hooks(capture.rule).materializes_early or capture.batch_size == 0
            or _use_ghost(capture, mode)):
        return False  # (an empty batch has nothing to form: the pass's end gives it zeros)
    tensors = capture.tensors()
    if any(x.dtype in _HALF for x in tensors):
        return False
    held = sum(x.numel() for x in tensors if x.is_floating_point())
    params = _params_of(capture)
    return capture.batch_size * sum(params[n].numel() for n in capture.names) <= held


def _use_ghost(capture: Capture, mode: str) -> bool:
    """Whether ``mode`` takes ``capture``'s norms by the ghost method (chosen once a call: the
    pass's end asks again what its backward asked)."""
    if capture.method is not None and capture.method[0] == mode:
        return capture.method[1]
    rule = capture.rule
    if mode == "materialize" or not rule.has_ghost_norm:
        ghost = False
    elif mode == "ghost":
        ghost = True
    else:
        speed = speed_hooks(rule)  # (a rule without a cost model materialises)
        module = capture.module
        ghost = speed.ghost_cost(module, capture) < speed.materialize_cost(module, capture)
    capture.method = (mode, ghost)
    return ghost


def _params_of(capture: Capture) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of a capture (as recorded at the call, else looked up now)."""
    if len(capture.params) == len(capture.names):
        return dict(zip(capture.names, capture.params))
    return {n: capture.module.get_parameter(n) for n in capture.names}


def masked(capture: Capture, keep: torch.Tensor) -> Capture:
    """A copy of ``capture`` in which dropped examples contribute zero (the rule knows where its
    tensors keep the batch)."""
    return capture.rule.masked(capture, keep)


class BackwardBatch:
    """Squared per-sample norms of every trainable parameter reached by one backward pass.

    Args:
        captures: completed captures of the pass (from ``Recorder``).
        mode: ``"auto"``, ``"ghost"`` or ``"materialize"``.
        scale: factor that turns a captured gradient into the gradient of one example's own
            loss (the batch size for a mean-reduced loss, 1 for a summed one).
        paths: module -> path, for error messages.

        units: under user-level privacy, the user of each row (``privgrad.engine.groups``):
            norms, weights and sums are then per user.

    Attributes:
        batch_size: number of examples in the pass (user-level: of users).
        rows: number of rows (examples) in the pass.
        norms_sq: ``{parameter: (batch_size,)}`` squared per-sample gradient norms (float32 or
            wider).
        methods: ``{module path: "ghost" | "materialize"}`` chosen for each call (for reports).
    """

    def __init__(self, captures: list[Capture], *, mode: str, scale_by_batch: bool, paths: dict,
                 units: Units | None = None):
        sizes = {c.batch_size for c in captures}
        if len(sizes) > 1:
            seen = ", ".join(f"{paths.get(c.module, '?')}: {c.batch_size}" for c in captures)
            raise PrivacyStateError(
                f"all layers of one backward pass must see the same number of examples; got "
                f"batch sizes {seen}. A layer whose output is broadcast over the batch (for "
                f"example position embeddings computed with a batch dimension of 1) mixes the "
                f"examples' gradients: give its input the batch dimension (expand it to the batch "
                f"size) or freeze the layer.")
        self.rows = sizes.pop() if sizes else 0
        self.scale = float(self.rows) if scale_by_batch else 1.0  # the loss averages rows
        if units is not None:  # user-level: the users are the batch (engine.groups)
            captures = by_unit(captures, units, _params_of)
        self.batch_size = units.count if units is not None else self.rows
        self.methods: dict[str, str] = {}
        self.norms_sq: dict[nn.Parameter, torch.Tensor] = {}
        self._grads: dict[nn.Parameter, torch.Tensor] = {}  # materialised, not yet scaled
        self._ghost: list[tuple[Capture, tuple[str, ...]]] = []
        self._ghost_params: list[dict[str, nn.Parameter]] = []

        self._params = [_params_of(c) for c in captures]
        every = [id(p) for params in self._params for p in params.values()]
        uses: dict[int, int] | None = None  # (None: no parameter is used twice, the usual case)
        if len(set(every)) < len(every):
            uses = defaultdict(int)
            for i in every:
                uses[i] += 1

        for c, params in zip(captures, self._params):
            module = c.module
            if c.early is not None:  # materialised during the backward pass
                self.methods[paths.get(module, type(module).__name__)] = "materialize"
                for n, g in c.early.items():
                    p = params[n]
                    self._grads[p] = self._grads[p] + g if p in self._grads else g
                continue
            shared = () if uses is None else tuple(n for n in c.names if uses[id(params[n])] > 1)
            single = tuple(n for n in c.names if n not in shared) if shared else tuple(c.names)
            ghost = bool(single) and _use_ghost(c, mode)
            self.methods[paths.get(module, type(module).__name__)] = (
                "ghost" if ghost else "materialize")
            if self.batch_size == 0:
                for p in params.values():
                    self._grads[p] = torch.zeros((0, *p.shape), dtype=p.dtype,  # not p.new_zeros:
                                                 device=p.device)  # (a DTensor for FSDP2)
                continue
            if ghost:
                for n, sq in c.rule.ghost_norms_sq(module, c, single).items():
                    self.norms_sq[params[n]] = sq
                self._ghost.append((c, single))
                self._ghost_params.append(params)
                single = ()
            names = single + shared
            if names:
                for n, g in c.rule.per_sample_gradients(module, c, names).items():
                    p = params[n]
                    self._grads[p] = self._grads[p] + g if p in self._grads else g
        for p, g in self._grads.items():  # the scale enters the norms and the weights, not g
            flat = g.reshape(g.shape[0], math.prod(g.shape[1:]))
            if flat.dtype != accumulation_dtype(flat.dtype):
                flat = flat.to(accumulation_dtype(flat.dtype))
            self.norms_sq[p] = torch.linalg.vector_norm(flat, dim=1).square() if flat.shape[1] \
                else flat.new_zeros(flat.shape[0])
        if self.scale != 1.0 and self.norms_sq:  # one grouped multiply, not one per parameter
            scaled = torch._foreach_mul(list(self.norms_sq.values()), self.scale**2)
            self.norms_sq = dict(zip(self.norms_sq, scaled))

    @property
    def parameters(self) -> list[nn.Parameter]:
        return list(self.norms_sq)

    def per_sample_gradients(self, param: nn.Parameter) -> torch.Tensor:
        """Materialised per-sample gradient of ``param`` (only for materialised parameters)."""
        g = self._grads[param]
        return g * self.scale if self.scale != 1.0 else g

    def weighted_sums(
        self, weights: torch.Tensor | dict[nn.Parameter, torch.Tensor], keep: torch.Tensor | None = None,
        *, sparse: bool = False, only: nn.Parameter | None = None,
    ) -> dict[nn.Parameter, torch.Tensor]:
        """``{p: sum_b w_b * g_b}`` with ``w`` one ``(B,)`` tensor or one per parameter.

        ``keep`` (``(B,)`` bool, optional) marks examples to include at all; dropped examples'
        inputs and gradients are zeroed first, so a NaN or inf in them cannot leak into the sum
        through ``0 * inf``. ``sparse``: return sparse COO tensors where a rule offers them and
        they are smaller (embeddings: a sum touches only the rows of the tokens seen), for a
        caller that adds the sums into dense buffers itself. ``only``: that parameter's sum
        alone (sharded training forms and reduces one parameter's full-shape sum at a time).
        """
        def w_of(p):
            return weights[p] if isinstance(weights, dict) else weights

        out: dict[nn.Parameter, torch.Tensor] = {}
        for p, g in self._grads.items():
            if only is not None and p is not only:
                continue
            if keep is not None:
                g = torch.where(keep.view(-1, *([1] * (g.dim() - 1))), g, 0)
            w = w_of(p).to(g.dtype)
            w = w * self.scale if self.scale != 1.0 else w
            out[p] = (w @ g.reshape(g.shape[0], -1)).view(g.shape[1:]) if g.shape[0] else \
                g.new_zeros(g.shape[1:])
        # ghost: the scale enters each weight tensor once (flat: one for every layer)
        scaled = {} if self.scale != 1.0 else None
        for (c, names), params in zip(self._ghost, self._ghost_params):
            if only is not None:
                names = tuple(n for n in names if params[n] is only)
                if not names:
                    continue
            if keep is not None:
                c = masked(c, keep)
            groups = [names] if not isinstance(weights, dict) else [(n,) for n in names]
            for group in groups:
                w = w_of(params[group[0]])
                if scaled is not None:
                    key = id(w)
                    if key not in scaled:
                        scaled[key] = (w, w * self.scale)  # (w kept: its id stays unique)
                    w = scaled[key][1]
                sums = c.rule.sparse_weighted_sum(c.module, c, group, w) if sparse else None
                if sums is None:
                    sums = c.rule.weighted_sum(c.module, c, group, w)
                for n, s in sums.items():
                    out[params[n]] = s
        return out
