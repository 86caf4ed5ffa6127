"""The forward pass of ``nn.LSTM`` and ``nn.GRU`` that keeps its gates, and what one
direction of one layer keeps for backpropagation through time (``Trace``).

The recurrent rule (``rnn.py``) needs every step's gates for its backward pass
(``rnn_bptt.py``). The native kernels compute them and discard them, so on a CPU an LSTM's or
GRU's forward is ``kept_forward()``, which keeps every gate as it computes it: nothing of the
forward pass runs twice. Elsewhere (other devices, ``proj_size``, packed input, a plain RNN)
``rnn_bptt.Recompute`` runs the layer again from the captured input.

Gate layouts are PyTorch's: LSTM ``(i, f, g, o)``, GRU ``(r, z, n)``. Index letters in the
shapes: ``b`` example, ``t`` step, ``g`` gate feature (``G`` = ``H``, ``4H`` or ``3H``),
``h`` hidden feature, ``i`` input feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from privgrad.layers.kernels import linear
from privgrad.layers.workspace import Lease

__all__ = ["Trace", "WorkArrays", "before_each_step", "fast_tanh", "kept_forward"]


def fast_tanh(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``tanh(x)`` as ``2 sigmoid(2x) - 1`` (into ``out``, or in place): on a CPU ``torch.tanh``
    is about 7x slower than ``torch.sigmoid`` (1.9 against 0.27 ms for 2^20 floats), and the
    four passes together cost a third of it. Absolute error within 2e-7 in float32 (3 units
    in the last place of 1; ``torch.tanh``: 3e-8), which is the rounding of any product with
    a value of order one, so exactness to 1e-5 of the gradients is not touched; the relative
    error grows only for ``|x|`` far below one, where the value itself is that small."""
    out = torch.mul(x, 2, out=x if out is None else out)
    return out.sigmoid_().mul_(2).sub_(1)


@dataclass
class Trace:
    """What one direction of one layer's forward pass keeps for its backward pass."""

    suffix: str
    x: torch.Tensor  # (b, t, i) the layer's input
    h_prev: torch.Tensor  # (b, t, h_out) the state before each step
    acts: torch.Tensor  # (b, t, g) activated gates (RNN: the new state)
    out: torch.Tensor  # (b, t, h_out) the outputs (0 at padded steps)
    extra: dict = field(default_factory=dict)  # LSTM: c, c_prev, m; GRU: gh_n


def kept_forward(module: nn.LSTM | nn.GRU, x: torch.Tensor, state, *, batch_first: bool,
                 lease: Lease | None = None):
    """An ``nn.LSTM`` (no ``proj_size``) or ``nn.GRU`` forward pass on a tensor input that keeps
    what its backward pass needs: ``(output, h_n, c_n or None, traces)``, the first three as the
    native kernel returns them (``output`` contiguous in the module's layout), ``traces`` for
    ``Recompute``.

    The native kernels discard their gates, so a rule that needs them would run the layer's
    products a second time (about a third of a private LSTM step on a CPU); computed here
    they are kept as they are made. The input's contribution to every gate is one product over
    the whole sequence; each step adds the state's product and applies the gates in place.

    Args:
        x: ``(b, t, i)`` batch first or ``(t, b, i)``, as the module takes it.
        state: ``(h0, c0)``, each ``(layers * directions, b, hidden)`` (``c0`` ``None`` for a
            GRU).
        lease: where the work arrays come from (reused from the module's last call), or
            ``None`` (fresh ones).
    """
    d, hidden = (2 if module.bidirectional else 1), module.hidden_size
    direction_pass = _lstm_direction if module.mode == "LSTM" else _gru_direction
    h0, c0 = state
    layer_in = x if batch_first else x.transpose(0, 1)  # (b, t, i), a view
    b, t = layer_in.shape[:2]
    traces, h_n, c_n = [], [], []
    with torch.no_grad():
        for layer in range(module.num_layers):
            out = x.new_empty((b, t, d * hidden) if batch_first else (t, b, d * hidden))
            out_bf = out if batch_first else out.transpose(0, 1)
            row = []
            for k in range(d):
                j = layer * d + k
                tr, h, c = direction_pass(module, f"_l{layer}" + ("_reverse" if k else ""),
                                          layer_in, h0[j], None if c0 is None else c0[j],
                                          out_bf[..., k * hidden:(k + 1) * hidden], bool(k),
                                          WorkArrays(lease, f"{j}."))
                row.append(tr)
                h_n.append(h)
                c_n.append(c)
            traces.append(row)
            layer_in = out_bf
    return out, torch.stack(h_n), None if c0 is None else torch.stack(c_n), traces


def _input_part(module, suffix: str, x, scale, arrays: WorkArrays, gates: int) -> torch.Tensor:
    """``(b, t, gates * hidden)``: ``x W_ih^T + b_ih`` (LSTM: ``+ b_hh``), rows times
    ``scale``, as one product into the reused array."""
    w_ih = getattr(module, "weight_ih" + suffix)
    bias = None
    if module.bias:
        bias = getattr(module, "bias_ih" + suffix)
        if module.mode == "LSTM":  # gi and gh enter the gates only as their sum
            bias = bias + getattr(module, "bias_hh" + suffix)
        bias = bias if scale is None else bias * scale
    w_t = (w_ih if scale is None else w_ih * scale.unsqueeze(1)).t()
    b, t = x.shape[:2]
    acts = arrays.empty("acts", (b, t, gates * module.hidden_size), x)
    x_rows, act_rows = x.reshape(b * t, -1), acts.view(b * t, -1)
    if bias is None:
        torch.mm(x_rows, w_t, out=act_rows)
    else:
        torch.addmm(bias, x_rows, w_t, out=act_rows)
    return acts


def before_each_step(initial: torch.Tensor, seq: torch.Tensor, reverse: bool,
                      into: torch.Tensor) -> torch.Tensor:
    """``into`` (``(b, t, f)``) filled with the value before each step of ``seq``: ``initial``
    at the first step (the last one when ``reverse``), then ``seq`` shifted by one step."""
    t = seq.shape[1]
    if reverse:
        into[:, t - 1], into[:, :t - 1] = initial, seq[:, 1:]
    else:
        into[:, 0], into[:, 1:] = initial, seq[:, :t - 1]
    return into


class WorkArrays:
    """Work arrays from a ``Lease`` (names prefixed, one set
    per layer and direction), or fresh ones without."""

    def __init__(self, lease: Lease | None, prefix: str):
        self.lease, self.prefix = lease, prefix

    def empty(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self.lease is None:
            return like.new_empty(shape)
        return self.lease.empty(self.prefix + name, shape, like)


def _lstm_direction(module: nn.LSTM, suffix: str, x, h, c, out, reverse: bool, arrays: WorkArrays):
    """One direction of one LSTM layer of ``kept_forward()``, writing its outputs into ``out``
    (``(b, t, hidden)``, a view): ``(trace, h_last, c_last)``. Rows of the cell gate ``g`` are
    scaled by 2 in the weights (exact in floating point), so one ``sigmoid`` over all four gates
    gives ``g = 2 sigmoid(2a) - 1 = tanh(a)``."""
    hidden = module.hidden_size
    w_hh = getattr(module, "weight_hh" + suffix)
    scale = torch.ones(4 * hidden, dtype=w_hh.dtype, device=w_hh.device)
    scale[2 * hidden:3 * hidden] = 2
    acts = _input_part(module, suffix, x, scale, arrays, 4)  # (b, t, 4h)
    w_hh = w_hh * scale.unsqueeze(1)
    b, t = x.shape[:2]
    # c_{t-1} and c_t as two views of one buffer: the initial cell in the extra slot
    cells = arrays.empty("cells", (b, t + 1, hidden), x)
    first, c_prev, c_all = (t, cells[:, 1:], cells[:, :t]) if reverse else (
        0, cells[:, :t], cells[:, 1:])
    cells[:, first] = c
    tanh_c = arrays.empty("tanh_c", (b, t, hidden), x)
    rows, cs, tcs, outs = acts.unbind(1), c_all.unbind(1), tanh_c.unbind(1), out.unbind(1)
    h0 = h
    for s in (range(t - 1, -1, -1) if reverse else range(t)):
        a = rows[s].add_(linear(h, w_hh)).sigmoid_()  # oneDNN's product: up to 2x MKL's addmm_ here
        i, f, g, o = a.chunk(4, 1)
        g.mul_(2).sub_(1)
        c = torch.mul(i, g, out=cs[s]).addcmul_(f, c)
        h = torch.mul(o, fast_tanh(c, out=tcs[s]), out=outs[s])
    h_prev = before_each_step(h0, out, reverse, arrays.empty("h_prev", out.shape, x))
    extra = {"c": c_all, "c_prev": c_prev, "tanh_c": tanh_c}
    return Trace(suffix, x, h_prev, acts, out, extra), h, c


def _gru_direction(module: nn.GRU, suffix: str, x, h, c, out, reverse: bool, arrays: WorkArrays):
    """One direction of one GRU layer of ``kept_forward()`` (``c`` unused):
    ``(trace, h_last, None)``. Per step: ``gh = W_hh h + b_hh``; ``r, z`` the sigmoid of the
    sums; ``n = tanh(gi_n + r gh_n)``; ``h' = n + z (h - n)``."""
    hidden = module.hidden_size
    w_hh = getattr(module, "weight_hh" + suffix)
    b_hh = getattr(module, "bias_hh" + suffix) if module.bias else None
    acts = _input_part(module, suffix, x, None, arrays, 3)  # (b, t, 3h): gi, then (r, z, n)
    b, t = x.shape[:2]
    gh_n = arrays.empty("gh_n", (b, t, hidden), x)
    rows, ghs, outs = acts.unbind(1), gh_n.unbind(1), out.unbind(1)
    h0 = h
    for s in (range(t - 1, -1, -1) if reverse else range(t)):
        gh = linear(h, w_hh, b_hh)  # (b, 3h)
        a = rows[s]
        a[:, :2 * hidden].add_(gh[:, :2 * hidden]).sigmoid_()
        r, z, n = a.chunk(3, 1)
        ghs[s].copy_(gh[:, 2 * hidden:])
        fast_tanh(n.addcmul_(r, ghs[s]))
        h = torch.sub(h, n, out=outs[s]).mul_(z).add_(n)
    h_prev = before_each_step(h0, out, reverse, arrays.empty("h_prev", out.shape, x))
    return Trace(suffix, x, h_prev, acts, out, {"gh_n": gh_n}), h, None
