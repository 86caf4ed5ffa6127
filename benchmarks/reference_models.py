"""The six reference models of the step-time benchmarks and one training step of each variant.

Every benchmark that times a step (``step_time.py`` in both of its modes, ``gpu_check.py``,
``guards.py``, ``clipping.py``, ``mechanisms.py``, ``ghost_norms.py``) builds its models and its
steps here, so that their numbers describe the same work:

- ``build(name, batch, variant)``: the model and one fixed batch ``(x, y)`` (seeded by the caller);
- ``prepare(name, batch, variant, device=..., dtype=..., sigma=...)``: that model on a device,
  its optimizer, the privacy engine (privgrad or Opacus) attached as the variant says, and
  ``step()``: forward + backward + (clip + noise) + optimizer step on the fixed batch.

Variants: ``nonprivate``; ``floor`` (the non-private step plus one ``torch.normal_`` draw per
parameter added to ``p.grad``: what any DP-SGD step must at least cost); ``privgrad`` and its
``privgrad-*`` variants (``privgrad-mkl``, the clipping modes, the correlated-noise mechanisms);
``opacus-<mode>`` for Opacus 1.6.0's ``grad_sample_mode``s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "cnn", "transformer", "lstm", "embedding", "bag")
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")
SIGMA, CLIP, LR = 1.0, 1.0, 0.01
#: variants of privgrad with another clipping mode (benchmarks/clipping.py runs them)
CLIPPING_VARIANTS = ("privgrad-automatic", "privgrad-adaptive")
#: variants of privgrad with correlated noise (benchmarks/mechanisms.py runs them): the number of
#: bands or buffers; each plans its noise for MECHANISM_STEPS steps
MECHANISM_VARIANTS = {"privgrad-bandmf4": ("bandmf", 4), "privgrad-bandmf16": ("bandmf", 16),
                      "privgrad-blt4": ("blt", 4)}
MECHANISM_STEPS = 10_000


# -- the five models of issue 4 (embedding models in two variants) ------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def cnn() -> nn.Module:
    layers, c_in = [], 3
    for i, c in enumerate((32, 64, 64, 128)):
        pool = nn.AvgPool2d(2) if i < 3 else nn.AdaptiveAvgPool2d(1)
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU(), pool]
        c_in = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128, 10))


class Block(nn.Module):
    """Pre-norm encoder block of plain Linear and LayerNorm layers (heads h, width d)."""

    def __init__(self, d=256, heads=4, ff=1024):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, vocab=10_000, seq=128, d=256, layers=2, classes=2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, idx):
        # contiguous: Opacus's ghost norm for embeddings calls .view on the indices, which
        # fails on an expanded tensor (privgrad takes either)
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx).contiguous()
        x = self.blocks(self.tok(idx) + self.pos(positions))
        return self.head(self.ln(x).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, lstm_type=nn.LSTM, vocab=10_000, d=128, hidden=256, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = lstm_type(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, idx):
        out, _ = self.lstm(self.emb(idx))
        return self.head(out[:, -1])


class BagOfEmbeddings(nn.Module):
    """Mean of the token embeddings, then an MLP: with ``nn.Embedding`` or ``nn.EmbeddingBag``."""

    def __init__(self, bag: bool, vocab=100_000, d=64, classes=2):
        super().__init__()
        self.bag = bag
        self.emb = nn.EmbeddingBag(vocab, d, mode="mean") if bag else nn.Embedding(vocab, d)
        self.head = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, idx):
        if self.bag:  # flat indices and offsets: the layout every Opacus mode expects
            b, t = idx.shape
            offsets = torch.arange(0, b * t, t, device=idx.device)
            return self.head(self.emb(idx.reshape(-1), offsets))
        return self.head(self.emb(idx).mean(1))


def toy() -> nn.Module:
    """Three Linear layers of width 8: a step whose kernels cost next to nothing, so that what a
    private step adds over the floor is privgrad's fixed cost with warm caches (what a GPU
    user pays on top of fast kernels). Not a reference model: ``fixed_cost.py --models toy``."""
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))


def build(name: str, batch: int, variant: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model and one fixed batch ``(x, y)``."""
    if name == "toy":
        return toy(), torch.randn(batch, 8), torch.randint(0, 10, (batch,))
    if name == "mlp":
        return mlp(), torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    if name == "cnn":
        return cnn(), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if name == "transformer":
        return Transformer(), torch.randint(0, 10_000, (batch, 128)), torch.randint(0, 2, (batch,))
    if name == "lstm":
        if variant.startswith("opacus"):  # Opacus needs its own LSTM (same parameters)
            from opacus.layers import DPLSTM

            return LSTMClassifier(DPLSTM), torch.randint(0, 10_000, (batch, 64)), torch.randint(0, 2, (batch,))
        return LSTMClassifier(), torch.randint(0, 10_000, (batch, 64)), torch.randint(0, 2, (batch,))
    if name not in ("embedding", "bag"):
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got model={name!r}. Pass "
                         f"one of them to --models.")
    bag = name == "bag"
    return BagOfEmbeddings(bag), torch.randint(0, 100_000, (batch, 50)), torch.randint(0, 2, (batch,))


def parse_models(parser, text: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``--models``'s comma-separated names; the parser's error names any unknown one (every
    script that takes ``--models`` refuses it the same way)."""
    names = text.split(",")
    unknown = [m for m in names if m not in (*MODELS, *extra)]
    if unknown:
        parser.error(f"--models must name models of step_time.py ({', '.join(MODELS)})"
                     + "".join(f" or {e}" for e in extra) + f"; got {','.join(unknown)}")
    return names


def psg_gb(name: str, batch: int) -> float:
    """Size of the per-sample gradients an Opacus materialising mode holds, in GB."""
    model, _, _ = build(name, 1, "privgrad")
    return batch * sum(p.numel() for p in model.parameters()) * 4 / 1e9


def opacus_skip(name: str, batch: int, variant: str, max_gb: float) -> str | None:
    """Why the Opacus ``variant`` is not run on this model and batch (``None``: it is run): a
    mode that would materialise more than ``max_gb`` GB of per-sample gradients could exhaust a
    shared machine's memory."""
    if variant != "opacus-ghost" and psg_gb(name, batch) > max_gb:
        return f"per-sample gradients ~{psg_gb(name, batch):.1f} GB"
    if variant == "opacus-ghost" and name == "bag" and psg_gb(name, batch) > max_gb:
        return "EmbeddingBag has no ghost norm in Opacus (materialises)"
    return None


# -- one variant's training step ----------------------------------------------------------------
@dataclass
class Prepared:
    """One variant of one model, ready to step: ``step()`` runs forward, backward, (clip and
    noise) and the optimizer step on the fixed batch ``(x, y)``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    params: list[torch.Tensor]
    step: Callable[[], None] = field(repr=False)
    engine: object = None  #: privgrad's ``PrivacyEngine`` for privgrad variants
    loader: object = None  #: the loader ``make_private`` returned (privgrad, Opacus)


def prepare(name: str, batch: int, variant: str, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None, sigma: float = SIGMA,
            built: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None) -> Prepared:
    """``name``'s model on ``device`` (floating parameters and inputs in ``dtype`` if given) with
    ``variant`` attached, its fixed batch, and its step. The caller seeds torch first: the model,
    the batch and the engine's seeds come from PyTorch's default generator. ``built``: a model
    and batch ``(model, x, y)`` made by the caller instead of ``build(name, ...)`` (the model's
    output and ``y`` must suit ``nn.CrossEntropyLoss``)."""
    model, x, y = built if built is not None else build(name, batch, variant)
    model = model.to(device=device, dtype=dtype)
    x, y = x.to(device), y.to(device)
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    copies = 32 if variant in MECHANISM_VARIANTS else 10  # cyclic sampling: b batches must fit
    data = torch.utils.data.TensorDataset(x.repeat(copies, *([1] * (x.dim() - 1))),
                                          y.repeat(copies, *([1] * (y.dim() - 1))))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    criterion = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    engine = None
    forward = None  # a compiled model (privgrad-compile), else the model itself

    if variant.startswith("privgrad"):
        from privgrad import PrivacyEngine

        if variant == "privgrad-mkl":  # the rules' products on torch's BLAS, not oneDNN
            from privgrad.layers import kernels

            kernels._onednn_linear_works = lambda: False

        engine = PrivacyEngine()
        # privgrad-automatic / privgrad-adaptive: the clipping modes that need no tuned bound
        clipping = variant.split("-")[1] if variant in CLIPPING_VARIANTS else "flat"
        mechanism = {}
        if variant in MECHANISM_VARIANTS:
            from privgrad.mechanisms import BLT, BandMF

            kind, size = MECHANISM_VARIANTS[variant]
            mechanism = {"steps": MECHANISM_STEPS, "mechanism": BandMF(num_bands=size)
                         if kind == "bandmf" else BLT(num_buffers=size, min_sep=16)}
        _, _, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=CLIP, clipping=clipping, **mechanism)
        if variant == "privgrad-compile":  # torch.compile (inductor) of the private model
            forward = torch.compile(model)
    elif variant.startswith("opacus"):
        from opacus import PrivacyEngine as OpacusEngine

        mode = variant.split("-")[1]
        made = OpacusEngine().make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=sigma, max_grad_norm=CLIP, poisson_sampling=False,
            grad_sample_mode=mode)
        model, optimizer, loader = made[0], made[1], made[-1]
        if mode == "ghost":
            criterion = made[2]
    elif variant not in ("nonprivate", "floor"):
        raise ValueError(f"variant must be nonprivate, floor, privgrad[-...] or opacus-<mode>; "
                         f"got variant={variant!r}. Pass one of the variants listed in "
                         f"reference_models.py's docstring.")

    def step():
        optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            drawn_batch(engine, batch)
        loss = criterion((model if forward is None else forward)(x), y)
        loss.backward()
        if variant == "floor":
            with torch.no_grad():
                for p in params:
                    p.grad.add_(torch.empty_like(p).normal_(0, sigma * CLIP))
        optimizer.step()

    return Prepared(model, optimizer, x, y, params, step, engine, loader)


def drawn_batch(engine, rows: int) -> None:
    """Report the fixed batch to the engine as the one its Poisson loader drew (what the loader
    does as it yields a batch): privgrad refuses rows its loader did not draw, and the benchmark
    times the step alone, without the loader's indexing and collation."""
    tracker = engine._rows.drawn
    sampler = engine._sampler
    tracker.queue(rows, sampler.step)  # (correlated noise takes the noise row of this step)
    sampler.step += 1
    tracker.deliver()


def engine_methods(engine) -> list[str]:
    """Which rule served each recorded layer, and by which method (for the notes)."""
    recorder = engine._recorder
    return [f"{type(m).__name__}:{type(r).__name__}" for m, r in recorder._rules.items()]
