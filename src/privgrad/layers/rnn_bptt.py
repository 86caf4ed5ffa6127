"""Backpropagation through time for ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``, written out.

The recurrent rule (``rnn.py``) needs, for every step ``t``, the gradient of the loss with respect
to the two linear maps of that step, ``gi_t = W_ih x_t + b_ih`` and ``gh_t = W_hh h_{t-1} + b_hh``
(and the LSTM projection ``h_t = W_hr m_t``). The native kernels compute those inside their
backward pass and discard them. ``Recompute`` takes the gates of every step from
``kept_forward()`` (an LSTM's or GRU's forward on a CPU, which
keeps them), or else runs the layer again from the captured input (the top layer from its own
output sequence). Then the backward pass goes step by step with the gates' closed-form
derivatives, from the captured output gradients. Written out it costs about what the native
forward and backward cost; through autograd it cost twice as much again (a graph of small
operations per step).

Gate layouts are PyTorch's: LSTM ``(i, f, g, o)``, GRU ``(r, z, n)``. Index letters in the
shapes: ``b`` example, ``t`` step, ``g`` gate feature (``G`` = ``H``, ``4H`` or ``3H``),
``h`` hidden feature, ``i`` input feature.

Padded steps of a ``PackedSequence`` (``lengths``) keep the state and output zero, as the packed
kernel skips them; their gradients pass the state gradient through unchanged and give zero gate
gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from privgrad.layers.kernels import linear
from privgrad.layers.projections import Projection
from privgrad.layers.rnn_forward import Trace, WorkArrays, before_each_step, fast_tanh
from privgrad.layers.workspace import Lease

__all__ = ["Recompute"]

_SIGMOID_BACKWARD = torch.ops.aten.sigmoid_backward.grad_input
_TANH_BACKWARD = torch.ops.aten.tanh_backward.grad_input


class Recompute:
    """The layer's linear maps for one call: its inputs and output gradients at every step.

    Args:
        module: the ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.
        x: ``(b, t, i)`` the input, batch first, in the original example order.
        lengths: ``(b,)`` valid steps per example (``PackedSequence``), or ``None``.
        state: ``(h0, c0)``, each ``(layers * directions, b, features)`` (``c0`` ``None`` unless
            LSTM).
        output: ``(b, t, d*h_out)`` the output sequence the layer's own forward pass returned,
            batch first, or ``None`` (then every layer is recomputed step by step).
        traces: what ``kept_forward()`` kept of the call (one row of directions per layer):
            then nothing of the forward pass is recomputed at all. Or ``None``.
        lease: where the gate gradients' arrays come from (see ``kept_forward()``).
    """

    def __init__(self, module: nn.RNNBase, x: torch.Tensor, lengths, state, output=None,
                 traces: list[list[Trace]] | None = None, lease: Lease | None = None):
        self.module, self.x, self.state, self.traces, self.lease = module, x, state, traces, lease
        self.directions = 2 if module.bidirectional else 1
        self.mask = None if lengths is None else (
            torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).to(x.device)  # (b, t)
        # The top layer's states are the layer's output: with them every step's gates come
        # from whole-sequence products instead of a step-by-step recurrence (padded sequences
        # keep the step-by-step pass, whose held states differ from the zero outputs).
        self.output = output if lengths is None else None

    def projections(self, grads, *, input_grad: bool = False):
        """The maps of every layer and direction, from ``grads``: ``(output (b, t, d*h_out),
        h_n, c_n or None)`` output gradients. With ``input_grad``, also the gradient of the
        input ``x`` (``(b, t, i)``): ``(maps, d_x)``."""
        g_out, g_h, g_c = grads
        m, d = self.module, self.directions
        h0, c0 = self.state
        traces, layer_in = self.traces or [], self.x
        width = m.proj_size or m.hidden_size
        with torch.no_grad():
            for layer in range(m.num_layers if self.traces is None else 0):
                top = self.output is not None and layer == m.num_layers - 1
                forward = self._forward_from_states if top else self._forward
                row = [forward(layer_in, layer, k, h0[layer * d + k],
                               None if c0 is None else c0[layer * d + k],
                               *((self.output[..., k * width:(k + 1) * width],) if top else ()))
                       for k in range(d)]
                traces.append(row)
                layer_in = torch.cat([tr.out for tr in row], -1) if d > 1 else row[0].out
            result, d_out = [], g_out
            for layer in reversed(range(m.num_layers)):
                d_in = None
                for k, tr in enumerate(traces[layer]):
                    j = layer * d + k
                    maps, d_x = self._backward(tr, d_out[..., k * width:(k + 1) * width], g_h[j],
                                               None if g_c is None else g_c[j],
                                               need_input=layer > 0 or input_grad)
                    result += maps
                    d_in = d_x if d_in is None else d_in + d_x
                d_out = d_in
        return (result, d_out) if input_grad else result

    def _weights(self, suffix: str) -> dict[str, torch.Tensor | None]:
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        return {n: (p.detach() if (p := getattr(self.module, n + suffix, None)) is not None else None)
                for n in names}

    def _forward(self, x, layer: int, direction: int, h, c) -> Trace:
        m, mode = self.module, self.module.mode
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w = self._weights(suffix)
        b, t = x.shape[:2]
        hidden = m.hidden_size
        gi = linear(x, w["weight_ih"], w["bias_ih"])  # (b, t, g): every step at once
        acts = torch.empty_like(gi)
        h_prev = x.new_empty((b, t, h.shape[-1]))
        out = x.new_zeros((b, t, h.shape[-1]))
        extra = {}
        if mode == "LSTM":
            extra = {"c": x.new_empty((b, t, hidden)), "c_prev": x.new_empty((b, t, hidden))}
            if w["weight_hr"] is not None:
                extra["m"] = x.new_empty((b, t, hidden))
        elif mode == "GRU":
            extra = {"gh_n": x.new_empty((b, t, hidden))}
        for s in (reversed(range(t)) if direction else range(t)):
            h_prev[:, s] = h
            gh = linear(h, w["weight_hh"], w["bias_hh"])
            c_new = None
            if mode == "LSTM":
                a = gi[:, s] + gh
                gates = torch.cat([torch.sigmoid(a[:, :2 * hidden]), torch.tanh(a[:, 2 * hidden:3 * hidden]),
                                   torch.sigmoid(a[:, 3 * hidden:])], 1)
                acts[:, s] = gates
                i, f, g, o = gates.chunk(4, 1)
                extra["c_prev"][:, s] = c
                c_new = f * c + i * g
                extra["c"][:, s] = c_new
                h_new = o * torch.tanh(c_new)
                if w["weight_hr"] is not None:
                    extra["m"][:, s] = h_new
                    h_new = linear(h_new, w["weight_hr"])
            elif mode == "GRU":
                gi_r, gi_z, gi_n = gi[:, s].chunk(3, 1)
                gh_r, gh_z, gh_n = gh.chunk(3, 1)
                r, z = torch.sigmoid(gi_r + gh_r), torch.sigmoid(gi_z + gh_z)
                n = torch.tanh(gi_n + r * gh_n)
                acts[:, s] = torch.cat([r, z, n], 1)
                extra["gh_n"][:, s] = gh_n
                h_new = (1 - z) * n + z * h
            else:
                a = gi[:, s] + gh
                h_new = torch.tanh(a) if mode == "RNN_TANH" else torch.relu(a)
                acts[:, s] = h_new
            if self.mask is None:
                h, c, out[:, s] = h_new, c_new, h_new
            else:
                keep = self.mask[:, s].unsqueeze(1)
                h = torch.where(keep, h_new, h)
                c = None if c is None else torch.where(keep, c_new, c)
                out[:, s] = torch.where(keep, h_new, out[:, s])
        return Trace(suffix, x, h_prev, acts, out, extra)

    def _forward_from_states(self, x, layer: int, direction: int, h, c, out) -> Trace:
        """``_forward()`` given the outputs ``out`` (``(b, t, h_out)``) the layer's own
        forward pass computed: the state before each step is the output of the step before, so
        both projections are products over the whole sequence and the gates elementwise
        functions of them; only the LSTM cell, ``c_t = f_t c_{t-1} + i_t g_t``, still needs a
        pass over the steps (one in-place multiply-add each). A plain RNN's gates are its
        outputs: nothing to compute."""
        mode, hidden = self.module.mode, self.module.hidden_size
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w = self._weights(suffix)
        t = x.shape[1]
        h_prev = before_each_step(h, out, bool(direction), torch.empty_like(out))
        extra = {}
        if mode == "LSTM":
            # gi + gh as one product over [x_t, h_{t-1}] (faster than two and an addition)
            bias = None if w["bias_ih"] is None else w["bias_ih"] + w["bias_hh"]
            acts = linear(torch.cat([x, h_prev], -1),
                          torch.cat([w["weight_ih"], w["weight_hh"]], 1), bias)  # (b, t, g)
            torch.sigmoid(acts[..., :2 * hidden], out=acts[..., :2 * hidden])
            fast_tanh(acts[..., 2 * hidden:3 * hidden])
            torch.sigmoid(acts[..., 3 * hidden:], out=acts[..., 3 * hidden:])
            i, f, g, o = acts.chunk(4, -1)
            cell = i * g  # (b, t, h): each step then adds f_t c_{t-1}
            steps = range(t - 1, -1, -1) if direction else range(t)
            before = c
            for s in steps:
                cell[:, s].addcmul_(f[:, s], before)
                before = cell[:, s]
            c_prev = before_each_step(c, cell, bool(direction), torch.empty_like(cell))
            extra = {"c": cell, "c_prev": c_prev}
            if w["weight_hr"] is not None:
                extra["m"] = torch.tanh(cell).mul_(o)
        elif mode == "GRU":
            gi_r, gi_z, gi_n = linear(x, w["weight_ih"], w["bias_ih"]).chunk(3, -1)
            gh_r, gh_z, gh_n = linear(h_prev, w["weight_hh"], w["bias_hh"]).chunk(3, -1)
            r = torch.sigmoid(gi_r + gh_r)
            z = torch.sigmoid(gi_z + gh_z)
            acts = torch.cat([r, z, torch.tanh(torch.addcmul(gi_n, r, gh_n))], -1)
            extra = {"gh_n": gh_n.contiguous()}
        else:
            acts = out  # the new state is the activated gate: no product needed
        return Trace(suffix, x, h_prev, acts, out, extra)

    def _local_derivatives(self, tr: Trace, out: torch.Tensor,
                           out_h: torch.Tensor | None = None) -> torch.Tensor | None:
        """Write every step's gate derivatives into ``out`` (``(b, t, g)``); for an LSTM also
        return ``o (1 - tanh(c)^2)`` (``(b, t, h)``), the output gradient's path into the cell.

        LSTM: ``out`` holds ``(g i (1 - i), c_prev f (1 - f), i (1 - g^2))`` (to be multiplied
        by ``dL/dc_t``) and ``tanh(c) o (1 - o)`` (by ``dL/dh_t``). RNN: ``1 - h^2`` (tanh) or
        ``h > 0`` (ReLU), by ``dL/dh_t``. GRU (``h' = (1 - z) n + z h``,
        ``n = tanh(gi_n + r gh_n)``), all by ``dL/dh_t``: ``out`` (the ``gi`` map) holds
        ``(F_n gh_n r (1 - r), (h - n) z (1 - z), F_n)`` with ``F_n = (1 - z)(1 - n^2)``, and
        ``out_h`` (the ``gh`` map) the same with its ``n`` block times ``r``.
        """
        acts = tr.acts
        if self.module.mode == "GRU":
            r, z, n = acts.chunk(3, -1)
            o_r, o_z, o_n = out.chunk(3, -1)
            _TANH_BACKWARD(1 - z, n, grad_input=o_n)
            _SIGMOID_BACKWARD(o_n * tr.extra["gh_n"], r, grad_input=o_r)
            _SIGMOID_BACKWARD(tr.h_prev - n, z, grad_input=o_z)
            out_h[..., :o_n.shape[-1] * 2].copy_(out[..., :o_n.shape[-1] * 2])
            torch.mul(o_n, r, out=out_h[..., o_n.shape[-1] * 2:])
            return None
        if self.module.mode == "RNN_TANH":
            torch.mul(acts, acts, out=out).neg_().add_(1)
            return None
        if self.module.mode == "RNN_RELU":
            out.copy_(acts > 0)
            return None
        # One fused pass each (these arrays are (b, t, h): on a CPU the passes, not the
        # arithmetic, are the cost): sigmoid_backward(x, s) = x s (1 - s),
        # tanh_backward(x, y) = x (1 - y^2).
        i, f, g, o = acts.chunk(4, -1)
        d_i, d_f, d_g, d_o = out.chunk(4, -1)
        _SIGMOID_BACKWARD(g, i, grad_input=d_i)
        _SIGMOID_BACKWARD(tr.extra["c_prev"], f, grad_input=d_f)
        _TANH_BACKWARD(i, g, grad_input=d_g)
        tc = tr.extra.pop("tanh_c", None)  # kept by kept_forward; overwritten below
        tc = fast_tanh(tr.extra["c"], out=torch.empty_like(tr.extra["c"])) if tc is None else tc
        _SIGMOID_BACKWARD(tc, o, grad_input=d_o)
        return _TANH_BACKWARD(o, tc, grad_input=tc)

    def _backward(self, tr: Trace, d_out, d_h, d_c, *, need_input: bool):
        """The maps of one direction and, if ``need_input``, the gradient of its input."""
        mode, hidden = self.module.mode, self.module.hidden_size
        w = self._weights(tr.suffix)
        t = d_out.shape[1]
        # Every step writes its row below. For RNN and LSTM the two maps of a step share one
        # gate gradient (gi and gh enter the gates only as their sum): one buffer serves both.
        arrays = WorkArrays(self.lease, tr.suffix + ".")
        d_gi = arrays.empty("d_gi", tr.acts.shape, tr.acts)
        d_gh = arrays.empty("d_gh", tr.acts.shape, tr.acts) if mode == "GRU" else d_gi
        d_hr = torch.empty_like(tr.out) if "m" in tr.extra else None
        d_h = d_h.clone()
        w_hh_t = w["weight_hh"].t()  # d_h = d_gates @ W_hh
        d_c = d_c.clone() if d_c is not None else None
        # The gates' local derivatives depend only on the forward pass: computed for every
        # step at once into d_gi (and d_gh), then each step multiplies its row by the incoming
        # gradients in place (a handful of small operations per step instead of ~20).
        d_cell = self._local_derivatives(tr, d_gi, d_gh)
        direction = tr.suffix.endswith("_reverse")
        outs = d_out.unbind(1)  # every step's views at once (the loop below is Python)
        if mode == "LSTM":  # row of step s: i, f, g factors times dc_all; o factor times d_new
            cells, rows = d_cell.unbind(1), d_gi.unbind(1)
            ifg = d_gi[..., :3 * hidden].unflatten(-1, (3, hidden)).unbind(1)
            o_rows = d_gi[..., 3 * hidden:].unbind(1)
            forgets = tr.acts[..., hidden:2 * hidden].unbind(1)
        elif mode == "GRU":  # rows of step s: every block times d_new
            gi_blocks = d_gi.unflatten(-1, (3, hidden)).unbind(1)
            gh_blocks = d_gh.unflatten(-1, (3, hidden)).unbind(1)
            gh_rows, updates = d_gh.unbind(1), tr.acts[..., hidden:2 * hidden].unbind(1)
        for s in (range(t) if direction else reversed(range(t))):
            d_new = d_h + outs[s]
            dc_new = d_c
            if self.mask is not None:
                keep = self.mask[:, s].unsqueeze(1)
                zero = torch.zeros((), dtype=d_new.dtype, device=d_new.device)
                d_new, carry_h = torch.where(keep, d_new, zero), torch.where(keep, zero, d_h)
                if d_c is not None:
                    dc_new, carry_c = torch.where(keep, d_c, zero), torch.where(keep, zero, d_c)
            if d_hr is not None:
                d_hr[:, s] = d_new
                d_new = linear(d_new, w["weight_hr"].t())
            if mode == "LSTM":
                dc_all = torch.addcmul(dc_new, d_new, cells[s])  # dL/dc_t
                ifg[s].mul_(dc_all.unsqueeze(1))
                o_rows[s].mul_(d_new)
                d_h, d_c = linear(rows[s], w_hh_t), dc_all * forgets[s]
            elif mode == "GRU":
                gi_blocks[s].mul_(d_new.unsqueeze(1))
                gh_blocks[s].mul_(d_new.unsqueeze(1))
                d_h = torch.addcmul(linear(gh_rows[s], w_hh_t), d_new, updates[s])
            else:
                row = d_gi[:, s].mul_(d_new)
                d_h = linear(row, w_hh_t)
            if self.mask is not None:
                d_h = d_h + carry_h
                if d_c is not None:
                    d_c = d_c + carry_c
        sfx = tr.suffix
        maps = [Projection(g=d_gi, a=tr.x, weight="weight_ih" + sfx,
                           bias="bias_ih" + sfx if w["bias_ih"] is not None else None),
                Projection(g=d_gh, a=tr.h_prev, weight="weight_hh" + sfx,
                           bias="bias_hh" + sfx if w["bias_hh"] is not None else None)]
        if d_hr is not None:
            maps.append(Projection(g=d_hr, a=tr.extra["m"], weight="weight_hr" + sfx))
        return maps, (linear(d_gi, w["weight_ih"].t()) if need_input else None)
