"""Recurrent layers: ``nn.RNN``, ``nn.LSTM`` (with ``proj_size``), ``nn.GRU``; any number of layers,
bidirectional, ``batch_first`` either way, tensor or ``PackedSequence`` input, with or without an
initial state. And their cells, ``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``: one step each.

Every weight of a recurrent layer enters through a linear map applied at every time step::

    input projection    gi_t = W_ih x_t + b_ih        (x_t: the layer's input at step t)
    hidden projection   gh_t = W_hh h_{t-1} + b_hh
    LSTM projection     h_t  = W_hr m_t               (proj_size > 0; m_t = o_t * tanh(c_t))

so, given the gradients of the loss with respect to ``gi_t``, ``gh_t`` and ``h_t``, each weight's
per-sample gradient, ghost norm and weighted sum are those of a linear layer over the ``T`` steps
(``projections.py``). The native kernels do not expose those gradients, so the rule pulls the
captured output gradients (of the output sequence, ``h_n`` and ``c_n``) back through the layer
itself, with the gates' own derivatives (``rnn_bptt.py``), and that pass gives the input's
gradient too, in place of the native backward. The gates come from privgrad's own forward of
an ``nn.LSTM`` or ``nn.GRU`` on a CPU, which keeps them (``rnn_forward.py``), or else from
recomputing the layer from the captured input and initial state. A cell's single step is recomputed with autograd.

Padded steps of a ``PackedSequence`` keep the state unchanged and output zero, exactly as the
packed kernel skips them, so they contribute nothing.

Index letters: ``b`` example, ``t`` step, ``g`` gate feature (``G`` = ``H`` for RNN, ``4H`` for
LSTM, ``3H`` for GRU).

Privacy:
    Exact: example ``b``'s rows depend only on example ``b``'s input, initial state and output
    gradients. Dropout between stacked layers (``dropout > 0`` with ``num_layers > 1``, in
    training mode) draws a mask the recomputation cannot reproduce, so such a call is refused
    (the validator reports it; ``privgrad.fix`` sets that dropout to 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.overrides import TorchFunctionMode

from privgrad.errors import UnsupportedModuleError
from privgrad.layers.base import Capture, LayerFinding
from privgrad.layers.projections import Projection, ProjectionRule
from privgrad.layers.rnn_bptt import Recompute
from privgrad.layers.rnn_forward import kept_forward
from privgrad.layers.workspace import workspace_of


def recurrent_dropout_active(module: nn.RNNBase) -> bool:
    """True if the layer draws a dropout mask between its stacked layers in this mode."""
    return module.training and module.dropout > 0 and module.num_layers > 1


def check_recurrent_dropout(module: nn.Module) -> LayerFinding | None:
    """The validator's finding for a recurrent layer with dropout between its stacked layers in
    training mode (whichever rule serves it, trainable or not), or ``None``."""
    if not (isinstance(module, nn.RNNBase) and recurrent_dropout_active(module)):
        return None
    return LayerFinding(
        f"dropout={module.dropout} between its {module.num_layers} stacked layers in training mode",
        "the dropout mask is drawn inside the native kernel, so the per-sample gradients cannot "
        "be recomputed exactly and training would stop with an error at the first step",
        "set dropout=0 (privgrad.fix(model) does this; apply nn.Dropout to the output instead), "
        "or stack single-layer modules with nn.Dropout between them",
        fixable=True)


def fix_recurrent_dropout(module: nn.Module):
    """``(the module with dropout=0, what it is now, why)``, or ``None``."""
    if not (isinstance(module, nn.RNNBase) and recurrent_dropout_active(module)):
        return None
    module.dropout = 0.0
    return module, f"{type(module).__name__}(dropout=0.0)", \
        "dropout inside the recurrent kernel cannot be reproduced for per-sample gradients"


class RecurrentRule(ProjectionRule):
    """Rule for ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``."""

    def batch_size(self, module, args, kwargs) -> int:
        x = args[0] if args else kwargs["input"]
        if isinstance(x, PackedSequence):
            return int(x.batch_sizes[0]) if len(x.batch_sizes) else 0
        if x.dim() != 3:
            raise UnsupportedModuleError(
                f"{type(module).__name__} needs a batch dimension (a 3-d input); got an input of "
                f"shape {tuple(x.shape)}. Add the batch dimension (x.unsqueeze("
                f"{0 if module.batch_first else 1})).")
        return int(x.shape[0] if module.batch_first else x.shape[1])

    def batch_dim(self, module) -> None:
        return None  # h_n keeps the batch in dimension 1 whatever batch_first says

    def compute(self, module: nn.RNNBase, capture: Capture) -> list[Projection]:
        if recurrent_dropout_active(module):
            raise UnsupportedModuleError(
                f"{type(module).__name__} with dropout={module.dropout} between its "
                f"{module.num_layers} layers cannot have exact per-sample gradients in training "
                f"mode: the dropout mask is drawn inside the native kernel and cannot be "
                f"reproduced; got dropout={module.dropout}. Set dropout=0 (privgrad.fix(model) "
                f"does this) and put nn.Dropout between single-layer modules if you need it.")
        x, lengths, state, grads = _batch_first(module, capture)
        return Recompute(module, x, lengths, state, _output(module, capture, x.dtype)).projections(grads)

    def forward_without_graph(self, module: nn.RNNBase) -> bool:
        """The layers' own forward (one native kernel call): the recomputation needs only the
        call's inputs and outputs."""
        return type(module).forward in (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)

    def graphless_forward(self, module: nn.RNNBase, args, kwargs, scratch: dict):
        """An ``nn.LSTM`` (no ``proj_size``) or ``nn.GRU`` on a CPU tensor input runs
        ``kept_forward()`` in place of the native kernel, which discards its gates: kept,
        they need not be recomputed for the backward (LSTM, batch 64, T 64, hidden 256: native
        forward and recomputation 46 -> 35 ms; batch 256: 196 -> 123). The native kernel stays
        on other devices (on a GPU a loop over the steps costs more than cuDNN's forward and
        the whole-sequence recomputation), under autocast, and for RNN and packed input."""
        x = args[0] if args else kwargs.get("input")
        weight = module.weight_ih_l0
        if (type(module).forward not in (nn.LSTM.forward, nn.GRU.forward) or module.proj_size
                or not isinstance(x, torch.Tensor) or x.dim() != 3 or x.device.type != "cpu"
                or weight.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
                or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu")):
            return None
        scratch["lease"] = workspace_of(module).lease()
        return _KeepGates(module, scratch)

    def joint_backward(self, module: nn.RNNBase, args, kwargs):
        """One backward for a call on a tensor input: the recomputation this rule needs
        anyway also gives the input's gradient (``d_gi @ W_ih``), so the native kernel's own
        backward (input and weight gradients, about as costly again) is skipped."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or recurrent_dropout_active(module):
            return None

        def backward(capture: Capture, needs_input_grad: bool):
            x, lengths, state, grads = _batch_first(module, capture)
            dtype = x.dtype
            weight_dtype = module.weight_hh_l0.dtype  # autocast: half inputs, float32 weights
            up = lambda t: t if t is None or t.dtype == weight_dtype else t.to(weight_dtype)  # noqa: E731
            x, state, grads = up(x), tuple(map(up, state)), tuple(map(up, grads))
            recompute = Recompute(module, x, lengths, state, _output(module, capture, weight_dtype),
                                  traces=capture.scratch.pop("traces", None),
                                  lease=capture.scratch.get("lease"))
            if not needs_input_grad:
                capture.scratch["projections"] = recompute.projections(grads)
                return None
            maps, d_x = recompute.projections(grads, input_grad=True)
            capture.scratch["projections"] = maps
            d_x = d_x.to(dtype)
            return d_x if module.batch_first else d_x.transpose(0, 1)
        return backward


class _KeepGates(TorchFunctionMode):
    """During one ``nn.LSTM`` or ``nn.GRU`` forward: its native kernel call (``_VF.lstm`` /
    ``_VF.gru`` on a tensor, with the module's own weights) computed by ``kept_forward()``
    instead, whose traces go to ``scratch["traces"]``; every other call as it is."""

    def __init__(self, module: nn.LSTM | nn.GRU, scratch: dict):
        super().__init__()
        self.module, self.scratch = module, scratch
        self.kernel = torch._VF.lstm if module.mode == "LSTM" else torch._VF.gru

    def __torch_function__(self, func, types, args=(), kwargs=None):
        m = self.module
        if (func is self.kernel and not kwargs and len(args) == 9 and "traces" not in self.scratch
                and (isinstance(args[1], (tuple, list)) or args[1].dim() == 3)):  # not packed
            x, hx, weights, bias, layers, dropout, train, bidirectional, batch_first = args
            if (len(weights) == len(m._flat_weights)
                    and all(w is v for w, v in zip(weights, m._flat_weights))
                    and (bias, layers, bidirectional) == (m.bias, m.num_layers, m.bidirectional)
                    and not (train and dropout > 0 and layers > 1)):
                state = tuple(hx) if isinstance(hx, (tuple, list)) else (hx, None)
                out, h, c, self.scratch["traces"] = kept_forward(
                    m, x, state, batch_first=batch_first, lease=self.scratch["lease"])
                return (out, h, c) if c is not None else (out, h)
        return func(*args, **(kwargs or {}))


def _batch_first(module: nn.RNNBase, capture: Capture):
    """The call's input ``(b, t, i)``, lengths (or ``None``), initial state and output
    gradients ``(output (b, t, d*h), h_n, c_n or None)``, all in the original example order."""
    args, kwargs = capture.args, capture.kwargs
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    grads = dict(zip(capture.output_index, capture.grad_outputs))
    lstm = isinstance(module, nn.LSTM)
    if isinstance(x, PackedSequence):
        packed = x
        x, lengths = pad_packed_sequence(packed, batch_first=True)
        first_state = 4  # leaves: data, batch_sizes, sorted_indices, unsorted_indices, h_n, c_n
        g_data = grads.get(0, torch.zeros((packed.data.shape[0], _out_features(module)),
                                          dtype=x.dtype, device=x.device))
        g_out, _ = pad_packed_sequence(packed._replace(data=g_data), batch_first=True,
                                       total_length=x.shape[1])
    else:
        lengths = None
        if not module.batch_first:
            x = x.transpose(0, 1)
        first_state = 1
        g_out = grads.get(0)
        if g_out is None:
            g_out = x.new_zeros((*x.shape[:2], _out_features(module)))
        elif not module.batch_first:
            g_out = g_out.transpose(0, 1)
    b = x.shape[0]
    d = 2 if module.bidirectional else 1
    h_shape = (module.num_layers * d, b, module.proj_size or module.hidden_size)
    c_shape = (module.num_layers * d, b, module.hidden_size)
    if hx is None:
        h0, c0 = x.new_zeros(h_shape), (x.new_zeros(c_shape) if lstm else None)
    else:
        h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
    g_h = grads.get(first_state, x.new_zeros(h_shape))
    g_c = grads.get(first_state + 1, x.new_zeros(c_shape)) if lstm else None
    state = (h0.detach(), None if c0 is None else c0.detach())
    return x.detach(), lengths, state, (g_out, g_h, g_c)


def _output(module: nn.RNNBase, capture: Capture, dtype: torch.dtype) -> torch.Tensor | None:
    """The output sequence of the call, batch first, if the capture kept it (tensor input)."""
    outputs = dict(zip(capture.output_index, capture.outputs))
    out = outputs.get(0)
    if out is None or isinstance(capture.args[0] if capture.args else capture.kwargs.get("input"),
                                 PackedSequence):
        return None
    out = out if module.batch_first else out.transpose(0, 1)
    return out if out.dtype == dtype else out.to(dtype)


def _out_features(module: nn.RNNBase) -> int:
    return (2 if module.bidirectional else 1) * (module.proj_size or module.hidden_size)


def _step(mode: str, gi, gh, h, c, *, cut_cell: bool = False):
    """One step from the two projections: ``(h_new, c_new, pre)``; ``pre`` is the LSTM's ``m_t``
    before its projection (the new ``h`` itself when there is none). ``cut_cell``: no gradient
    from ``h_new`` into ``c_new`` (when the captured gradient of ``c_new`` already holds it)."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        pre = torch.sigmoid(o) * torch.tanh(c_new.detach() if cut_cell else c_new)
        return pre, c_new, pre
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None, None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gi + gh), None, None


def _tracked(y: torch.Tensor) -> torch.Tensor:
    """``y`` as a node autograd can report a gradient for (inputs without grad give leaves)."""
    return y if y.requires_grad else y.requires_grad_()


class RecurrentCellRule(ProjectionRule):
    """Rule for ``nn.RNNCell``, ``nn.LSTMCell`` and ``nn.GRUCell``: one step, the two
    projections over one position. A cell called in a loop is one use per step; the engine adds
    the uses of its parameters into one per-sample gradient."""

    def batch_size(self, module, args, kwargs) -> int:
        x = args[0] if args else kwargs["input"]
        if x.dim() != 2:
            raise UnsupportedModuleError(
                f"{type(module).__name__} needs a batch dimension (a 2-d input); got an input of "
                f"shape {tuple(x.shape)}. Add the batch dimension (x.unsqueeze(0)).")
        return int(x.shape[0])

    def __init__(self):
        self._cell_feeds_hidden: dict[tuple, bool] = {}

    def compute(self, module: nn.RNNCellBase, capture: Capture) -> list[Projection]:
        args, kwargs = capture.args, capture.kwargs
        x = (args[0] if args else kwargs["input"]).detach()
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        lstm = isinstance(module, nn.LSTMCell)
        zeros = x.new_zeros((x.shape[0], module.hidden_size))
        h, c = (hx if lstm else (hx, None)) if hx is not None else (zeros, zeros if lstm else None)
        grads = dict(zip(capture.output_index, capture.grad_outputs))
        mode = "LSTM" if lstm else "GRU" if isinstance(module, nn.GRUCell) else (
            "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU")
        weights = {n: None if p is None else p.detach() for n, p in (
            (n, getattr(module, n)) for n in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"))}
        h = h.detach()
        with torch.enable_grad():
            gi = _tracked(F.linear(x, weights["weight_ih"], weights["bias_ih"]))
            gh = _tracked(F.linear(h, weights["weight_hh"], weights["bias_hh"]))
            h_new, c_new, _ = _step(mode, gi, gh, h, None if c is None else c.detach(),
                                    cut_cell=lstm and self._feeds_hidden(module, x))
            loss = (h_new * grads.get(0, torch.zeros_like(h_new))).sum()
            if lstm and 1 in grads:
                loss = loss + (c_new * grads[1]).sum()
            found = torch.autograd.grad(loss, [gi, gh], allow_unused=True)
        d_gi, d_gh = (g if g is not None else torch.zeros_like(y) for g, y in zip(found, (gi, gh)))
        bias = module.bias
        return [
            Projection(g=d_gi.unsqueeze(1), a=x.unsqueeze(1), weight="weight_ih",
                       bias="bias_ih" if bias else None),
            Projection(g=d_gh.unsqueeze(1), a=h.unsqueeze(1), weight="weight_hh",
                       bias="bias_hh" if bias else None),
        ]

    def _feeds_hidden(self, module: nn.LSTMCell, x: torch.Tensor) -> bool:
        """Whether this backend's LSTM cell computes ``h'`` from ``c'`` in the autograd graph
        (the CPU kernel does, CUDA's fused kernel does not). Then the captured gradient of
        ``c'`` already holds the path through ``h'``, which must not be counted again."""
        key = (x.device.type, x.dtype)
        if key not in self._cell_feeds_hidden:
            with torch.enable_grad():
                w_ih = module.weight_ih.detach().requires_grad_()
                zero = x.new_zeros((1, module.hidden_size))
                h, c = torch.lstm_cell(x.new_zeros((1, module.input_size)), (zero, zero), w_ih,
                                       module.weight_hh.detach(), None, None)
                path = torch.autograd.grad(h.sum(), c, allow_unused=True)[0]
            self._cell_feeds_hidden[key] = path is not None
        return self._cell_feeds_hidden[key]
