"""The single-backward fast path: input-only backward (no parameter gradients formed), outputs
that are views, the cost model's switch points (both sides of each), and whole models through
``PrivacyEngine`` against a one-example-at-a-time reference of the private update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privgrad import PrivacyEngine
from privgrad.engine import PerSampleGradients
from privgrad.errors import PrivacyStateError
from tests.helpers import drawn
from tests.layers.cases import check_module
from tests.reference import assert_close, loop_per_example

D = torch.float64

# (name, layer, input shape, does the rule's input-only backward apply?)
LAYERS = [
    ("linear-2d", lambda: nn.Linear(4, 3), (5, 4), True),
    ("linear-3d", lambda: nn.Linear(4, 3, bias=False), (3, 2, 4), True),
    ("conv1d", lambda: nn.Conv1d(2, 3, 3, padding=1), (3, 2, 7), True),
    ("conv2d-strided-grouped", lambda: nn.Conv2d(4, 6, (2, 3), stride=(2, 1), dilation=(1, 2),
                                                 groups=2, padding=1), (2, 4, 7, 8), True),
    ("conv2d-same-odd", lambda: nn.Conv2d(2, 3, 3, padding="same"), (2, 2, 5, 6), True),
    ("conv2d-same-even", lambda: nn.Conv2d(2, 2, 4, padding="same"), (2, 2, 5, 6), False),
    ("conv2d-reflect", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 5), False),
    ("conv3d", lambda: nn.Conv3d(2, 2, 3, stride=2, padding=1), (2, 2, 5, 6, 5), True),
]


def _run(layer, x, r, skip, mode="auto"):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with PerSampleGradients(layer, mode=mode, skip_parameter_grads=skip) as psg:
        (torch.tanh(layer(x)) * r).sum().backward()
    return psg, x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("name,make,shape,applies", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_input_only_backward_matches_autograd(name, make, shape, applies, mode):
    layer = make().double()
    x = torch.randn(*shape, dtype=D)
    r = torch.randn_like(layer(x))
    plain, grad_x, grads = _run(layer, x, r, skip=False, mode=mode)
    fast, fast_grad_x, fast_grads = _run(layer, x, r, skip=True, mode=mode)
    assert_close(fast_grad_x, grad_x, 1e-12, f"{name}: input gradient")
    assert_close(fast.norms, plain.norms, 1e-12, f"{name}: per-sample norms")
    w = torch.rand(shape[0], dtype=D)
    plain_sums, fast_sums = plain.batch.weighted_sums(w), fast.batch.weighted_sums(w)
    for p, s in plain_sums.items():
        assert_close(fast_sums[p], s, 1e-12, f"{name}: weighted sum")
    for n, g in fast_grads.items():
        if applies:
            assert g is None, f"{name}: autograd formed the gradient of {n}"
        else:
            assert_close(g, grads[n], 1e-12, f"{name}: autograd's own backward for {n}")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("name,make,shape,applies", LAYERS, ids=[c[0] for c in LAYERS])
def test_input_only_per_sample_results_are_exact(name, make, shape, applies):
    check_module(make().double(), (torch.randn(*shape, dtype=D),), skip_parameter_grads=True)


def test_input_only_with_frozen_weight_anchors_on_the_bias():
    layer = nn.Linear(4, 3).double()
    layer.weight.requires_grad_(False)
    x = torch.randn(5, 4, dtype=D)
    r = torch.randn(5, 3, dtype=D)
    plain, grad_x, _ = _run(layer, x, r, skip=False)
    fast, fast_grad_x, grads = _run(layer, x, r, skip=True)
    assert_close(fast_grad_x, grad_x, 1e-12, "input gradient")
    assert_close(fast.norms, plain.norms, 1e-12, "bias norms")
    assert grads["bias"] is None and grads["weight"] is None


@pytest.mark.parametrize("bag", [False, True])
def test_embeddings_form_no_dense_gradient(bag):
    layer = (nn.EmbeddingBag(50, 3, mode="mean") if bag else nn.Embedding(50, 3)).double()
    idx = torch.randint(0, 50, (4, 6))
    check_module(layer, (idx,), skip_parameter_grads=True)
    with PerSampleGradients(layer, mode="auto", skip_parameter_grads=True):
        layer(idx).sum().backward()
    assert layer.weight.grad is None


def test_embedding_bag_with_trainable_per_sample_weights_keeps_autograd():
    layer = nn.EmbeddingBag(6, 2, mode="sum").double()
    idx, offsets = torch.tensor([1, 1, 3, 4, 0, 2]), torch.tensor([0, 2, 4])
    psw = torch.rand(6, dtype=D, requires_grad=True)
    with PerSampleGradients(layer, mode="auto", skip_parameter_grads=True):
        layer(idx, offsets, per_sample_weights=psw).sum().backward()
    assert layer.weight.grad is not None and psw.grad is not None


class InPlaceAfterView(nn.Module):
    """Linear on 3-d input returns a view; ReLU(inplace=True) then rewrites its history."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("skip", [False, True])
def test_in_place_on_a_view_output_keeps_the_layer(skip):
    # Without the unviewed output, fc1's output-gradient hook never fired: fc1 was left out.
    check_module(InPlaceAfterView().double(), (torch.randn(3, 2, 4, dtype=D),),
                 skip_parameter_grads=skip)


@pytest.mark.parametrize("skip", [False, True])
def test_in_place_activation_after_a_linear_keeps_its_output_gradient(skip):
    # input_only()'s node records the output gradient itself (no tensor hook): the gradient of
    # the value the layer produced, before ReLU(inplace=True) rewrote it
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()
    check_module(model, (torch.randn(6, 4, dtype=D),), skip_parameter_grads=skip)


@pytest.mark.parametrize("skip", [False, True])
def test_a_second_backward_pass_is_refused_in_the_rule_backward_too(skip):
    # with skip, the Linear layers' output gradients arrive through input_only()'s node
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with PerSampleGradients(model, skip_parameter_grads=skip):
        loss = model(torch.randn(3, 4, dtype=D)).square().sum()
        loss.backward(retain_graph=True)
        with pytest.raises(PrivacyStateError, match="clip them twice"):
            loss.backward()


# -- the cost model: both sides of every switch -------------------------------------------------
SWITCHES = [
    # Linear: ghost when T (d + p) < d p (here d = p = 4: T = 1 ghost, T = 3 materialise)
    ("linear", lambda: nn.Linear(4, 4), lambda: torch.randn(3, 1, 4, dtype=D), "ghost"),
    ("linear", lambda: nn.Linear(4, 4), lambda: torch.randn(3, 3, 4, dtype=D), "materialize"),
    # ... also where the Gram products are formed in halves (GRAM_HALVES_MIN = 256 positions):
    # d = p = 400 materialises (its per-sample gradients are smaller than the capture, though
    # the halves' 3/4 of 256^2 (d + p) is less than 256 d p); d = p = 600 takes the ghost norm
    ("linear", lambda: nn.Linear(400, 400), lambda: torch.randn(3, 256, 400, dtype=D),
     "materialize"),
    ("linear", lambda: nn.Linear(600, 600), lambda: torch.randn(3, 256, 600, dtype=D), "ghost"),
    # Conv: ghost when L (i + o) < i o (i = 18, o = 3: L = 2 ghost, L = 4 materialise; and
    # while the whole per-sample tensor is small: see test_convolution_norms_in_chunks)
    ("conv", lambda: nn.Conv1d(2, 3, 9), lambda: torch.randn(3, 2, 10, dtype=D), "ghost"),
    ("conv", lambda: nn.Conv1d(2, 3, 9), lambda: torch.randn(3, 2, 12, dtype=D), "materialize"),
    # Embedding: ghost when T < V
    ("embedding", lambda: nn.Embedding(10, 3), lambda: torch.randint(0, 10, (3, 2)), "ghost"),
    ("embedding", lambda: nn.Embedding(3, 3), lambda: torch.randint(0, 3, (3, 5)), "materialize"),
    # EmbeddingBag: ghost when T < V
    ("bag", lambda: nn.EmbeddingBag(10, 3), lambda: torch.randint(0, 10, (3, 2)), "ghost"),
    ("bag", lambda: nn.EmbeddingBag(3, 3), lambda: torch.randint(0, 3, (3, 5)), "materialize"),
]


@pytest.mark.parametrize("kind,make,inputs,expected", SWITCHES,
                         ids=[f"{s[0]}-{s[3]}" for s in SWITCHES])
@pytest.mark.parametrize("skip", [False, True])
def test_cost_model_switch_points(kind, make, inputs, expected, skip):
    layer = make().double()
    x = inputs()
    check_module(layer, (x,), modes=("auto",), skip_parameter_grads=skip)
    with PerSampleGradients(layer, mode="auto", skip_parameter_grads=skip) as psg:
        layer(x).sum().backward()
    assert psg.batch.methods == {"": expected}


# -- whole models through PrivacyEngine ---------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self, vocab=20, d=8, t=5):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.ln, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2, self.head = nn.Linear(d, 16), nn.Linear(16, d), nn.Linear(d, 3)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]).expand_as(idx))
        q, k, v = self.qkv(self.ln(x)).chunk(3, -1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.emb(idx))).mean(1))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
            lambda g: torch.randn(7, 6, generator=g)),
    "cnn": (cnn, lambda g: torch.randn(7, 3, 6, 6, generator=g)),
    "transformer": (TinyTransformer, lambda g: torch.randint(0, 20, (7, 5), generator=g)),
    "bag": (lambda: nn.Sequential(nn.EmbeddingBag(30, 4, mode="mean"), nn.Linear(4, 3)),
            lambda g: torch.randint(0, 30, (7, 6), generator=g)),
    "tied": (Tied, lambda g: torch.randint(0, 7, (7, 3), generator=g)),
}


def reference_update(model, x, y, c, expected_batch):
    """``sum_b min(1, C/||g_b||) g_b / expected batch`` from one-example gradients, float64."""
    model = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    grads = loop_per_example(model, lambda i: ((x[i:i + 1],), {}),
                             lambda i, out: F.cross_entropy(out, y[i:i + 1]), x.shape[0])
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    factor = (c / norms).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factor, g) / expected_batch for n, g in grads.items()}


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("name", list(MODELS))
def test_private_update_equals_the_reference(name, mode):
    make, inputs = MODELS[name]
    model = make()
    g = torch.Generator().manual_seed(1)
    x, y = inputs(g), torch.randint(0, 3, (7,), generator=g)
    c, expected_batch = 0.5, 7.0
    ref = reference_update(model, x, y, c, expected_batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    data = torch.utils.data.TensorDataset(x, y)
    engine = PrivacyEngine()
    engine.make_private(
        module=model, optimizer=optimizer, data_loader=torch.utils.data.DataLoader(data, batch_size=7),
        noise_multiplier=0.0, max_grad_norm=c, grad_sample_mode=mode)
    # the first pass is self-checked (autograd's backward); the second takes the fast paths
    # (lr = 0: the model, and so the reference, stays the same)
    for step in range(2):
        optimizer.zero_grad()
        drawn(engine, len(x))
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for n, p in model.named_parameters():
            assert_close(p.grad, ref[n], 1e-5, f"{name}/{mode}/step {step}: {n}")


def test_frozen_then_unfrozen_parameter_is_served_by_the_fast_path():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    ref = reference_update(model, x, y, 1.0, 5.0)
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    data = torch.utils.data.TensorDataset(x, y)
    engine = PrivacyEngine()
    engine.make_private(
        module=model, optimizer=optimizer, data_loader=torch.utils.data.DataLoader(data, batch_size=5),
        noise_multiplier=0.0, max_grad_norm=1.0)
    model[0].requires_grad_(True)  # unfrozen after attaching
    formed = []  # gradients autograd formed for a parameter (the engine clears p.grad anyway)

    def seen(grad):
        if grad is not None:  # (the fast path's input-only backward leaves it undefined)
            formed.append(grad)
    for p in model.parameters():
        p.register_hook(seen)
    # the first pass is self-checked (autograd forms the gradients it compares with); the
    # second is served by the fast path
    for expected_formed in (4, 0):
        formed.clear()
        optimizer.zero_grad()
        drawn(engine, len(x))
        F.cross_entropy(model(x), y).backward()
        assert len(formed) == expected_formed
        optimizer.step()
        for n, p in model.named_parameters():
            assert_close(p.grad, ref[n], 1e-5, n)


# -- embedding sums as rows, added straight into the noise --------------------------------------
def _bag_batches(mode_per_pass, vocab=100):
    """Two backward passes over an EmbeddingBag model, one per engine mode given (20 tokens
    each)."""
    model = nn.Sequential(nn.EmbeddingBag(vocab, 3, mode="mean"), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(3)
    out = []
    for mode in mode_per_pass:
        x = torch.randint(0, vocab, (5, 4), generator=g)
        with PerSampleGradients(model, mode=mode, skip_parameter_grads=True) as psg:
            model(x).sum().backward()
        out.append(psg.batch)
    return model, out


@pytest.mark.parametrize("modes, vocab, stays_sparse", [
    (("ghost", "ghost"), 100, True), (("ghost", "materialize"), 100, False),
    (("materialize", "ghost"), 100, False),
    (("ghost", "ghost"), 40, False),  # 2 x 20 token rows are not fewer than 40 dense rows
    (("ghost", "ghost"), 20, False),  # a pass with as many tokens as rows is dense at once
])
def test_clipped_sums_mix_sparse_and_dense_passes(modes, vocab, stays_sparse):
    from privgrad.engine import ClippedSum

    model, batches = _bag_batches(modes, vocab)
    params = list(model.parameters())
    sparse, dense = ClippedSum(0.7, sparse_sums=True), ClippedSum(0.7)
    for b in batches:
        sparse.add(b, set(params))
    assert sparse.sums[params[0]].is_sparse == stays_sparse
    for b in batches:
        w = torch.ones(b.batch_size, dtype=D)
        total = torch.stack(list(b.norms_sq.values())).sum(0).sqrt()
        w = (0.7 / total).clamp(max=1.0)
        for p, s in b.weighted_sums(w).items():  # dense (sparse=False by default)
            assert not s.is_sparse
            dense.sums[p] = dense.sums[p] + s if p in dense.sums else s
    for p in params:
        got = sparse.sums[p]
        assert_close(got.to_dense() if got.is_sparse else got, dense.sums[p], 1e-12, "sum")


class PlainSource:
    """A noise source that is not TorchGaussian: it adds the noise itself (as secure mode)."""

    secure = False
    fuses_sums = False

    def add_noise(self, total, std):
        assert not total.is_sparse
        return total + std


@pytest.mark.parametrize("source", ["torch", "plain"])
def test_noisy_gradients_with_sparse_sums(source):
    from privgrad.privatize import TorchGaussian, noisy_gradients

    weight = nn.Parameter(torch.zeros(6, 2, dtype=D))
    rows = torch.sparse_coo_tensor(torch.tensor([[1, 4, 1]]), torch.ones(3, 2, dtype=D), (6, 2),
                                   check_invariants=False)
    noise = TorchGaussian() if source == "torch" else PlainSource()
    torch.manual_seed(5)
    got = noisy_gradients([weight], {weight: rows}, noise_std=0.3, normaliser=4.0, noise=noise)
    torch.manual_seed(5)
    ref = noisy_gradients([weight], {weight: rows.to_dense()}, noise_std=0.3, normaliser=4.0,
                          noise=noise)
    assert_close(got[weight], ref[weight], 1e-12, "noisy gradient")
    if source == "plain":  # (sum + 0.3) / 4 exactly
        assert_close(got[weight], (rows.to_dense() + 0.3) / 4.0, 1e-12, "plain source")


# -- materialising during the backward pass ---------------------------------------------------
def test_small_per_sample_gradients_are_formed_during_backward_and_free_their_tensors(monkeypatch):
    # A LayerNorm over a sequence: per-sample gradients (2 x 4 per example) are smaller than its
    # input and output gradient (2 x 5 x 4): formed as soon as its output gradient is in, before
    # the backward pass reaches the layer below, and the capture lets go of both. So is the
    # Linear below it, materialised over 5 positions (12 weights against 5 x (3 + 4)).
    from privgrad.engine.capture import Recorder

    formed = []
    original = Recorder._materialize_now

    def spy(self, capture):
        original(self, capture)
        formed.append(capture)
    monkeypatch.setattr(Recorder, "_materialize_now", spy)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).double()
    x = torch.randn(2, 5, 3, dtype=D, requires_grad=True)
    at_input = []
    x.register_hook(lambda g: at_input.append([type(c.module) for c in formed]))
    check_module(model, (x.detach(),))  # same results as the references, every mode
    formed.clear()
    with PerSampleGradients(model, mode="auto") as psg:
        model(x).sum().backward()
    assert at_input == [[nn.LayerNorm, nn.Linear]]  # both before the pass reached the input
    ln = formed[0]
    assert ln.args == () and ln.grad_outputs == [] and set(ln.early) == {"weight", "bias"}
    assert psg.batch.methods == {"0": "materialize", "1": "materialize"}
    assert_close(psg.gradients["1.weight"], ln.early["weight"], 0, "the early gradients are used")


class TwoUses(nn.Module):
    """One Linear and one LayerNorm applied to the input's mean (formed at the end of the pass)
    and then over the sequence (formed during backward: 9 weights against 6 x (3 + 3) numbers per
    example): one per-sample gradient per parameter, the sum of its uses, in either order."""

    def __init__(self):
        super().__init__()
        self.lin, self.ln = nn.Linear(3, 3), nn.LayerNorm(3)

    def forward(self, x):
        pooled = self.ln(self.lin(x.mean(1)))
        return pooled + self.ln(self.lin(x)).sum(1)


def test_a_parameter_used_early_and_late_is_one_per_sample_gradient(monkeypatch):
    from privgrad.engine.capture import Recorder

    formed = []
    original = Recorder._materialize_now
    monkeypatch.setattr(Recorder, "_materialize_now",
                        lambda self, c: formed.append(type(c.module)) or original(self, c))
    model = TwoUses().double()
    check_module(model, (torch.randn(4, 6, 3, dtype=D),))
    assert nn.Linear in formed and nn.LayerNorm in formed  # some uses formed during backward
