"""nn.RNN, nn.LSTM and nn.GRU: per-sample gradients against one-example references for every
layout (stacked, bidirectional, batch_first either way, PackedSequence, initial state, LSTM
projection), batch sizes 0 and 1 included, and private steps of an LSTM text classifier; and
their cells, unrolled step by step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from privgrad.engine import PerSampleGradients
from privgrad.errors import UnsupportedModuleError
from privgrad.layers.linear import GRAM_HALVES_MIN
from tests.layers.cases import check_module
from tests.helpers import drawn
from tests.models.harness import check_per_sample, check_private_step, references

D = torch.float64


class Readout(nn.Module):
    """Every output of a recurrent layer (sequence, h_n, c_n) in one batch-first tensor."""

    def __init__(self, rnn: nn.RNNBase, packed: bool = False):
        super().__init__()
        self.rnn, self.packed = rnn, packed

    def forward(self, x, lengths=None, hx=None):
        t = x.shape[1 if self.rnn.batch_first else 0]
        if self.packed:
            x = pack_padded_sequence(x, lengths, batch_first=self.rnn.batch_first,
                                     enforce_sorted=False)
        out, h = self.rnn(x, hx)
        if self.packed:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
        elif not self.rnn.batch_first:
            out = out.transpose(0, 1)
        states = h if isinstance(h, tuple) else (h,)
        return torch.cat([out.flatten(1)] + [s.transpose(0, 1).flatten(1) for s in states], 1)


LAYOUTS = [
    (nn.RNN, dict(num_layers=2)),
    (nn.RNN, dict(nonlinearity="relu", bidirectional=True)),
    (nn.LSTM, dict(num_layers=2, bidirectional=True)),
    (nn.LSTM, dict(proj_size=2, bidirectional=True)),
    (nn.LSTM, dict(num_layers=2, bias=False)),
    (nn.GRU, dict(num_layers=2, bidirectional=True)),
    (nn.GRU, dict()),
]
IDS = [f"{k.__name__}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'plain'}" for k, kw in LAYOUTS]


@pytest.mark.parametrize("kind,kwargs", LAYOUTS, ids=IDS)
def test_batch_first(kind, kwargs):
    model = Readout(kind(3, 4, batch_first=True, **kwargs)).double()
    check_module(model, (torch.randn(4, 5, 3, dtype=D),))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
@pytest.mark.parametrize("kind,kwargs", LAYOUTS, ids=IDS)
def test_float32_engine_against_float64_references(kind, kwargs):
    # float32 is where the rule's products run on oneDNN (privgrad.layers.kernels) on CPU
    model = Readout(kind(3, 4, batch_first=True, **kwargs)).double()
    check_module(model, (torch.randn(4, 5, 3, dtype=D),), engine_dtype=torch.float32)


@pytest.mark.parametrize("kind,kwargs", LAYOUTS[2:4] + LAYOUTS[5:6], ids=IDS[2:4] + IDS[5:6])
def test_sequence_first_with_initial_state(kind, kwargs):
    rnn = kind(3, 4, **kwargs).double()
    model = Readout(rnn)
    b, d = 3, 2 if rnn.bidirectional else 1
    x = torch.randn(5, b, 3, dtype=D)  # (t, b, i)
    h0 = torch.randn(rnn.num_layers * d, b, rnn.proj_size or 4, dtype=D)
    hx = (h0, torch.randn(rnn.num_layers * d, b, 4, dtype=D)) if kind is nn.LSTM else h0

    def example(i):
        one = tuple(h[:, i:i + 1] for h in hx) if isinstance(hx, tuple) else hx[:, i:i + 1]
        return (x[:, i:i + 1],), {"hx": one}

    check_module(model, (x,), {"hx": hx}, batch=b, example=example)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_packed_sequences_of_different_lengths(kind, batch_first):
    # torch.func cannot run the packed kernel, so the reference is the one-example loop.
    model = Readout(kind(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first),
                    packed=True).double()
    x = torch.randn(4, 6, 3, dtype=D)
    lengths = torch.tensor([6, 2, 4, 1])
    xs = x if batch_first else x.transpose(0, 1)
    r = torch.randn_like(model(xs, lengths))

    def example(i):
        return ((x[i:i + 1] if batch_first else xs[:, i:i + 1]), lengths[i:i + 1]), {}

    check_per_sample(model, (xs, lengths), {}, example, lambda rows, out: (out * r[rows]).sum(),
                     4, func=False)


@given(b=st.integers(0, 3), t=st.integers(1, 4), kind=st.sampled_from([nn.RNN, nn.LSTM, nn.GRU]),
       bidirectional=st.booleans())
def test_shapes_including_empty_and_single_batches(b, t, kind, bidirectional):
    torch.manual_seed(b * 10 + t)
    model = Readout(kind(2, 3, batch_first=True, bidirectional=bidirectional)).double()
    check_module(model, (torch.randn(b, t, 2, dtype=D),))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_long_sequence_gram_in_halves(kind):
    # GRAM_HALVES_MIN steps and one more: the ghost norms' Gram products are formed in halves
    torch.manual_seed(7)
    model = Readout(kind(2, 3, batch_first=True)).double()
    check_module(model, (torch.randn(2, GRAM_HALVES_MIN + 1, 2, dtype=D),))


def test_partly_frozen():
    rnn = nn.LSTM(3, 4, batch_first=True).double()
    rnn.weight_hh_l0.requires_grad_(False)
    ref = check_module(Readout(rnn), (torch.randn(3, 4, 3, dtype=D),))
    assert set(ref) == {"rnn.weight_ih_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"}


def test_dropout_between_layers_is_refused_in_training_and_fine_in_eval():
    model = Readout(nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True)).double()
    x = torch.randn(3, 4, 3, dtype=D)
    with pytest.raises(UnsupportedModuleError, match=r"dropout=0.5 between its 2 layers.*privgrad.fix"):
        with PerSampleGradients(model):
            model(x).sum().backward()
    check_module(model.eval(), (x,))


def test_unbatched_input_is_refused():
    rnn = nn.LSTM(3, 4)
    with pytest.raises(UnsupportedModuleError, match=r"needs a batch dimension.*unsqueeze\(1\)"):
        with PerSampleGradients(rnn):
            rnn(torch.randn(5, 3))[0].sum().backward()


class Unrolled(nn.Module):
    """A cell applied step by step (one use per step), every state in the output."""

    def __init__(self, cell: nn.RNNCellBase):
        super().__init__()
        self.cell = cell

    def forward(self, x, h0=None):
        state, outs = h0, []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            outs += list(state) if isinstance(state, tuple) else [state]
        return torch.cat(outs, 1)


CELLS = [nn.RNNCell(3, 4), nn.RNNCell(3, 4, nonlinearity="relu", bias=False), nn.LSTMCell(3, 4),
         nn.GRUCell(3, 4)]


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{type(c).__name__}-{c.bias}")
def test_cells_unrolled_with_an_initial_state(cell):
    # The CPU LSTM cell computes h' from c' inside autograd, so the gradient captured for c'
    # already holds the path through h': counting it again would be wrong (it was, once).
    b = 3
    h0 = torch.randn(b, 4, dtype=D)
    state = (h0, torch.randn(b, 4, dtype=D)) if isinstance(cell, nn.LSTMCell) else h0
    x = torch.randn(b, 5, 3, dtype=D)

    def example(i):
        one = tuple(s[i:i + 1] for s in state) if isinstance(state, tuple) else state[i:i + 1]
        return (x[i:i + 1], one), {}

    check_module(Unrolled(cell.double()), (x, state), batch=b, example=example)


@given(b=st.integers(0, 3), t=st.integers(1, 3),
       kind=st.sampled_from([nn.RNNCell, nn.LSTMCell, nn.GRUCell]))
def test_cells_over_shapes_including_empty_and_single_batches(b, t, kind):
    torch.manual_seed(b * 10 + t)
    check_module(Unrolled(kind(2, 3).double()), (torch.randn(b, t, 2, dtype=D),))


class TextClassifier(nn.Module):
    """Embedding -> LSTM -> linear head on the last hidden state (the speed issue's LSTM model,
    shrunk)."""

    def __init__(self, vocab=20, width=8, hidden=6, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, idx):
        _, (h, _) = self.lstm(self.embed(idx))
        return self.head(h[-1])


def classifier_case(b=5, t=7):
    model = TextClassifier().double()
    idx, y = torch.randint(0, 20, (b, t)), torch.randint(0, 3, (b,))

    def loss(rows, logits):
        return nn.functional.cross_entropy(logits, y[rows], reduction="sum")

    return model, (idx,), {}, lambda i: ((idx[i:i + 1],), {}), loss, b


def test_text_classifier_per_sample():
    check_per_sample(*classifier_case())


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_text_classifier_private_step(mode):
    check_private_step(*classifier_case(), mode=mode)


def test_dropped_non_finite_example_is_masked_in_the_rules_own_layout():
    # A dropped example's rows are zeroed inside the rule's own batch-first tensors: here h_n has
    # 2 rows (directions) in dimension 0, which zeroing rows "by batch" would wrongly hit.
    model = Readout(nn.LSTM(3, 4, bidirectional=True, batch_first=True)).double()
    x = torch.randn(2, 5, 3, dtype=D)
    x[1, 2, 0] = float("nan")
    r = torch.randn(2, 5 * 8 + 2 * 2 * 4, dtype=D)  # output, then h_n and c_n of 2 directions
    ref = references(model, lambda i: ((x[:1],), {}), lambda rows, out: (out * r[:1]).sum(), 1,
                     func=False)  # example 0 alone
    names = {p: n for n, p in model.named_parameters()}
    for mode in ("ghost", "materialize"):
        with PerSampleGradients(model, mode=mode) as psg:
            (model(x) * r).sum().backward()
        model.zero_grad()
        assert torch.isnan(psg.norms[1]) and torch.isfinite(psg.norms[0])
        sums = psg.batch.weighted_sums(torch.tensor([0.5, 0.0], dtype=D),
                                       keep=torch.tensor([True, False]))
        for p, s in sums.items():
            torch.testing.assert_close(s, 0.5 * ref[names[p]][0], rtol=1e-9, atol=1e-12)


def _readout_case(kind, kwargs, packed=False, b=4, t=5):
    rnn = kind(3, 4, batch_first=True, **kwargs)
    model = Readout(rnn, packed=packed).double()
    x = torch.randn(b, t, 3, dtype=D)
    lengths = torch.tensor([5, 2, 4, 1][:b]) if packed else None
    args = (x, lengths) if packed else (x,)
    r = torch.randn_like(model(*args))

    def example(i):
        return ((x[i:i + 1], lengths[i:i + 1]) if packed else (x[i:i + 1],)), {}

    return model, args, {}, example, lambda rows, out: (out * r[rows]).sum(), b


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind,kwargs", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[5]],
                         ids=[IDS[0], IDS[1], IDS[5]])
def test_rnn_and_gru_private_step(kind, kwargs, packed):
    """sigma = 0: one private step writes exactly the clipped sum (plain RNN and GRU too)."""
    case = _readout_case(kind, kwargs, packed=packed)
    for mode in ("ghost", "materialize"):
        check_private_step(*case, mode=mode)


class _Below(nn.Module):
    """A linear layer under the recurrent one, so private training needs the recurrent layer's
    input gradient: its one backward (``joint_backward``) replaces the native kernel's."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.lin, self.read = nn.Linear(3, 3), Readout(rnn)

    def forward(self, x, hx=None):  # x: (b, t, i) whatever the recurrent layer's layout
        y = torch.tanh(self.lin(x))
        return self.read(y if self.read.rnn.batch_first else y.transpose(0, 1), hx=hx)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind,kwargs", LAYOUTS, ids=IDS)
def test_private_step_through_the_joint_backward(kind, kwargs, batch_first):
    rnn = kind(3, 4, batch_first=batch_first, **kwargs).double()
    model = _Below(rnn).double()
    b, t, d = 4, 5, 2 if rnn.bidirectional else 1
    x = torch.randn(b, t, 3, dtype=D)
    h0 = torch.randn(rnn.num_layers * d, b, rnn.proj_size or 4, dtype=D)
    hx = (h0, torch.randn(rnn.num_layers * d, b, 4, dtype=D)) if kind is nn.LSTM else h0
    r = torch.randn_like(model(x, hx))

    def example(i):
        one = tuple(h[:, i:i + 1] for h in hx) if isinstance(hx, tuple) else hx[:, i:i + 1]
        return (x[i:i + 1],), {"hx": one}

    def loss(rows, out):
        return (out * r[rows]).sum()

    for mode in ("ghost", "materialize"):
        check_private_step(model, (x,), {"hx": hx}, example, loss, b, mode=mode)
    # the recurrent layer first: its input needs no gradient, the joint backward still runs
    first = Readout(rnn)
    xs = x if batch_first else x.transpose(0, 1)
    r1 = torch.randn_like(first(xs, hx=hx))

    def example1(i):
        one = tuple(h[:, i:i + 1] for h in hx) if isinstance(hx, tuple) else hx[:, i:i + 1]
        return ((xs[i:i + 1] if batch_first else xs[:, i:i + 1]),), {"hx": one}

    check_private_step(first, (xs,), {"hx": hx}, example1, lambda rows, out: (out * r1[rows]).sum(), b)


@pytest.mark.parametrize("kind,kwargs", LAYOUTS, ids=IDS)
def test_gates_from_the_output_sequence_match_the_step_by_step_recomputation(kind, kwargs):
    # Recompute(output=...) reads the top layer's states from the layer's own output; the
    # projections (inputs and gate gradients of every map) must be those of the full recurrence
    from privgrad.layers.rnn_bptt import Recompute

    torch.manual_seed(0)
    rnn = kind(3, 4, batch_first=True, **kwargs).double()
    b, t, d = 3, 6, 2 if rnn.bidirectional else 1
    x = torch.randn(b, t, 3, dtype=D)
    h0 = torch.randn(rnn.num_layers * d, b, rnn.proj_size or 4, dtype=D)
    c0 = torch.randn(rnn.num_layers * d, b, 4, dtype=D) if kind is nn.LSTM else None
    with torch.no_grad():
        out, _ = rnn(x, (h0, c0) if c0 is not None else h0)
    grads = (torch.randn_like(out), torch.randn_like(h0), None if c0 is None else torch.randn_like(c0))
    _same_projections(Recompute(rnn, x, None, (h0, c0), out), Recompute(rnn, x, None, (h0, c0)),
                      grads)


def _same_projections(fast, slow, grads):
    """Two ways to the projections of one call give the same maps and input gradient."""
    fast, d_fast = fast.projections(grads, input_grad=True)
    slow, d_slow = slow.projections(grads, input_grad=True)
    assert [p.weight for p in fast] == [p.weight for p in slow]
    for p, q in zip(fast, slow):
        torch.testing.assert_close(p.g, q.g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.a, q.a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_fast, d_slow, rtol=1e-10, atol=1e-12)


def _graphless_calls(monkeypatch):
    """Record, for every recurrent forward the recorder runs without a graph, the module."""
    from privgrad.engine.capture import Recorder

    calls = []
    original = Recorder._graphless_starts

    def spy(self, module, args, kwargs):
        original(self, module, args, kwargs)
        calls.append(module in self._graphless)
    monkeypatch.setattr(Recorder, "_graphless_starts", spy)
    return calls


@pytest.mark.parametrize("kind,kwargs", LAYOUTS, ids=IDS)
def test_private_step_with_the_forward_run_without_a_graph(kind, kwargs, monkeypatch):
    # Under PrivacyEngine the native forward runs without autograd (its inference kernel); the
    # rule's joint backward gives the input gradient and the clipped sums, as with the graph.
    calls = _graphless_calls(monkeypatch)
    rnn = kind(3, 4, batch_first=True, **kwargs).double()
    model = _Below(rnn).double()
    x = torch.randn(4, 5, 3, dtype=D)
    r = torch.randn_like(model(x))

    def example(i):
        return (x[i:i + 1],), {}

    check_private_step(model, (x,), {}, example, lambda rows, out: (out * r[rows]).sum(), 4)
    assert calls == [False, True]  # the engine's first step is self-checked, on the graph
    assert torch.is_grad_enabled()


def test_forward_keeps_its_graph_where_another_hook_could_see_it(monkeypatch):
    # A user's forward hook on the layer sees its outputs as autograd made them: then the
    # forward keeps its graph. And a forward that raises gives grad mode back.
    calls = _graphless_calls(monkeypatch)
    model = _Below(nn.LSTM(3, 4, batch_first=True)).double()
    seen = []
    handle = model.read.rnn.register_forward_hook(lambda m, a, out: seen.append(out[0].requires_grad))
    x = torch.randn(4, 5, 3, dtype=D)
    r = torch.randn_like(model(x))
    seen.clear()
    check_private_step(model, (x,), {}, lambda i: ((x[i:i + 1],), {}),
                       lambda rows, out: (out * r[rows]).sum(), 4)
    assert calls == [False, False] and seen and all(seen)  # (the references call it too)
    handle.remove()
    from privgrad import PrivacyEngine

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    engine.make_private(module=model, optimizer=optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                        data_loader=torch.utils.data.DataLoader(torch.zeros(16, 5, 3), batch_size=4))
    _self_checked_step(engine, model, optimizer, x)  # later forwards run without a graph
    with pytest.raises(RuntimeError):
        model.read.rnn(torch.randn(4, 5, 7, dtype=D))  # wrong input width: the layer raises
    assert calls[-1] is True and torch.is_grad_enabled()
    engine.detach()


def _self_checked_step(engine, model, optimizer, x):
    """The engine's first step: self-checked, on autograd's own backward (the forward keeps its
    graph and the native kernel); the forwards after it take the fast paths."""
    optimizer.zero_grad()
    drawn(engine, len(x))
    model(x).sum().backward()
    optimizer.step()


KEPT = [(k, kw) for k, kw in LAYOUTS if k in (nn.LSTM, nn.GRU) and not kw.get("proj_size")]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind,kwargs", KEPT, ids=[IDS[LAYOUTS.index(c)] for c in KEPT])
def test_forward_that_keeps_its_gates(kind, kwargs, batch_first):
    # kept_forward returns what the native kernel returns (output contiguous in the module's
    # layout), and its traces give the projections of the step-by-step recomputation
    from privgrad.layers.rnn_bptt import Recompute
    from privgrad.layers.rnn_forward import kept_forward

    torch.manual_seed(0)
    rnn = kind(3, 4, batch_first=batch_first, **kwargs).double()
    lstm = kind is nn.LSTM
    b, t, d = 3, 6, 2 if rnn.bidirectional else 1
    x = torch.randn(b, t, 3, dtype=D)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    h0 = torch.randn(rnn.num_layers * d, b, 4, dtype=D)
    c0 = torch.randn(rnn.num_layers * d, b, 4, dtype=D) if lstm else None
    with torch.no_grad():
        out, h_n = rnn(x, (h0, c0) if lstm else h0)
    h_n, c_n = h_n if lstm else (h_n, None)
    kept_out, kept_h, kept_c, traces = kept_forward(rnn, x, (h0, c0), batch_first=batch_first)
    assert kept_out.is_contiguous() and kept_out.shape == out.shape and (kept_c is None) == (not lstm)
    for mine, native in ((kept_out, out), (kept_h, h_n)) + (((kept_c, c_n),) if lstm else ()):
        torch.testing.assert_close(mine, native, rtol=1e-10, atol=1e-12)
    xb = x if batch_first else x.transpose(0, 1)
    grads = (torch.randn(b, t, d * 4, dtype=D), torch.randn_like(h_n),
             torch.randn_like(c_n) if lstm else None)
    _same_projections(Recompute(rnn, xb, None, (h0, c0), traces=traces),
                      Recompute(rnn, xb, None, (h0, c0)), grads)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_private_steps_use_the_kept_gates_and_leave_no_mode_behind(kind, monkeypatch):
    # Under PrivacyEngine an LSTM's or GRU's forward is kept_forward (nothing recomputed);
    # a float32 step (tanh through the logistic function) matches float64 references to 1e-5;
    # the function mode is gone after the forward, also after one that raises in the kernel call.
    import privgrad.layers.rnn as rnn_rule
    import privgrad.layers.rnn_bptt as bptt
    from privgrad import PrivacyEngine

    kept, recomputed = [], []
    real = rnn_rule.kept_forward
    monkeypatch.setattr(rnn_rule, "kept_forward", lambda *a, **k: kept.append(1) or real(*a, **k))
    monkeypatch.setattr(bptt.Recompute, "_forward_from_states",
                        lambda *a, **k: recomputed.append(1))
    model = _Below(kind(3, 4, num_layers=2, batch_first=True)).double()
    x = torch.randn(4, 5, 3, dtype=D)
    r = torch.randn_like(model(x))
    check_private_step(model, (x,), {}, lambda i: ((x[i:i + 1],), {}),
                       lambda rows, out: (out * r[rows]).sum(), 4)
    assert kept and not recomputed
    assert torch._C._len_torch_function_stack() == 0
    wide = _Below(kind(3, 32, batch_first=True)).double()
    x = 3 * torch.randn(6, 20, 3, dtype=D)
    r = torch.randn_like(wide(x))
    ref = references(wide, lambda i: ((x[i:i + 1],), {}), lambda rows, out: (out * r[rows]).sum(), 6,
                     func=False)
    kept.clear()
    check_private_step(wide.float(), (x.float(),), {}, None,
                       lambda rows, out: (out * r[rows].float()).sum(), 6, ref=ref, rtol=1e-5)
    assert kept and not recomputed

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    engine.make_private(module=model, optimizer=optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                        data_loader=torch.utils.data.DataLoader(torch.zeros(16, 5, 3), batch_size=4))
    _self_checked_step(engine, model, optimizer, x)  # later forwards are kept_forward
    monkeypatch.setattr(rnn_rule, "kept_forward", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(x.float().double())
    assert torch._C._len_torch_function_stack() == 0 and torch.is_grad_enabled()
    engine.detach()


def test_recurrent_layers_keep_the_native_kernel_where_the_loop_would_not_pay(monkeypatch):
    # RNN, proj_size, packed input and autocast keep the native kernel (and the recomputation)
    import privgrad.layers.rnn as rnn_rule

    kept = []
    real = rnn_rule.kept_forward
    monkeypatch.setattr(rnn_rule, "kept_forward", lambda *a, **k: kept.append(1) or real(*a, **k))
    rule = rnn_rule.RecurrentRule()
    x = torch.randn(2, 5, 3)
    assert rule.graphless_forward(nn.LSTM(3, 4, proj_size=2, batch_first=True), (x,), {}, {}) is None
    assert rule.graphless_forward(nn.RNN(3, 4, batch_first=True), (x,), {}, {}) is None
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    assert rule.graphless_forward(nn.LSTM(3, 4, batch_first=True), (packed,), {}, {}) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rule.graphless_forward(nn.LSTM(3, 4, batch_first=True), (x,), {}, {}) is None
    assert rule.graphless_forward(nn.LSTM(3, 4, batch_first=True), (x,), {}, {}) is not None
    assert rule.graphless_forward(nn.GRU(3, 4, batch_first=True), (x,), {}, {}) is not None
    assert not kept


class _Twice(nn.Module):
    """One LSTM called twice in one forward pass (two leases of its workspace at once)."""

    def __init__(self):
        super().__init__()
        self.lin, self.rnn = nn.Linear(3, 3), nn.LSTM(3, 4, batch_first=True)

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        a, _ = self.rnn(y)
        b, _ = self.rnn(y.flip(1) * 2)
        return torch.cat([a, b], 1).flatten(1)


def test_lstm_work_arrays_are_reused_across_steps_and_never_shared_within_one():
    # The kept gates live in the module's workspace: given back after a step's clipped sums,
    # reused by the next step (also at a smaller batch), never by two calls of one step; every
    # step still gives the reference clipped sum. Detaching the engine frees the workspace.
    from privgrad import PrivacyEngine
    from privgrad.layers import workspace
    from tests.models.harness import close, floor_of, norms_of

    torch.manual_seed(0)
    for model in (_Below(nn.LSTM(3, 4, batch_first=True)).double(), _Twice().double()):
        rnn = model.read.rnn if isinstance(model, _Below) else model.rnn
        steps = []  # (x, r, reference per-sample gradients), made before the engine attaches
        for b in (5, 5, 3):
            x = torch.randn(b, 6, 3, dtype=D)
            with torch.no_grad():
                r = torch.randn_like(model(x))
            steps.append((x, r, references(model, lambda i, x=x: ((x[i:i + 1],), {}),
                                           lambda rows, out, r=r: (out * r[rows]).sum(), b,
                                           func=False)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        engine = PrivacyEngine(accountant="rdp")
        c = 1e-4  # below every example's norm: every example is clipped
        engine.make_private(module=model, optimizer=optimizer, noise_multiplier=0.0,
                            max_grad_norm=c, loss_reduction="sum",
                            data_loader=torch.utils.data.DataLoader(torch.zeros(16), batch_size=4))
        seen = []
        # the engine's first step is self-checked, on autograd's backward (no workspace): the
        # first batch goes twice, and the workspace is watched from the second step on
        for i, (x, r, ref) in enumerate([steps[0], *steps]):
            norms = norms_of(ref, x.shape[0])
            assert (norms > c).all()
            optimizer.zero_grad()
            drawn(engine, len(x))
            (model(x) * r).sum().backward()
            optimizer.step()
            for name, p in model.named_parameters():
                expected = torch.einsum("b,b...->...", c / norms, ref[name])
                close(p.grad, expected, 1e-8, floor_of(ref), f"clipped sum of {name}")
            if i:
                seen.append({k: v.data_ptr() for k, v in workspace.workspace_of(rnn)._free.items()})
        assert {k[0] for k in seen[0]} == {"0.acts", "0.cells", "0.tanh_c", "0.h_prev", "_l0.d_gi"}
        if isinstance(model, _Below):  # one call a step: the same memory every step
            assert seen[0] == seen[1] == seen[2]
        engine.detach()
        assert rnn not in workspace._WORKSPACES


def test_workspace_lease_reuse_and_growth():
    from privgrad.layers.workspace import Workspace

    space, like = Workspace(), torch.zeros(1, dtype=torch.float64)
    first = space.lease()
    a = first.empty("a", (4, 5), like)
    second = space.lease()
    b = second.empty("a", (4, 5), like)
    assert a.data_ptr() != b.data_ptr()  # both held: two arrays
    first.give_back()
    second.give_back()
    third = space.lease()
    c = third.empty("a", (2, 3), like)  # smaller: the kept array
    assert c.data_ptr() in (a.data_ptr(), b.data_ptr()) and c.shape == (2, 3) and c.is_contiguous()
    third.give_back()
    fourth = space.lease()
    d = fourth.empty("a", (10, 10), like)  # larger: a new array, with room to spare
    assert d.shape == (10, 10) and d.untyped_storage().nbytes() >= 100 * 8
    assert d.dtype == torch.float64
    fourth.give_back()
    assert fourth.empty("a", (10, 11), like).data_ptr() == d.data_ptr()  # within the slack
