"""A ResNet-18-shaped convnet written here (no torchvision): BatchNorm, in-place ReLU, residual
additions in place, downsampling shortcuts, AdaptiveAvgPool and Dropout. The validator finds
every BatchNorm, fix() swaps in GroupNorm, and the fixed model's per-sample gradients (dropout
active, masks shared with the reference) and private step are exact; it then trains privately."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import privgrad
from privgrad import PrivacyEngine
from tests.models.harness import check_per_sample, check_private_step

D = torch.float64


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision does
        return self.relu(out)


class ResNet18(nn.Module):
    """Four stages of two basic blocks; widths 4-8-16-32 for a test-sized model."""

    def __init__(self, widths=(4, 8, 16, 32), classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(c, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.dropout(self.pool(self.layers(self.stem(x))).flatten(1)))


def test_validator_finds_every_batch_norm_and_fix_replaces_them():
    model = ResNet18()
    findings = privgrad.validate(model)
    assert len(findings) == 20 and all(f.module_type == "BatchNorm2d" and f.fixable for f in findings)
    replacements = []
    fixed = privgrad.fix(model, report=replacements)
    assert {str(r).split(": ", 1)[1].split(" (")[0] for r in replacements} == {
        "BatchNorm2d -> GroupNorm(4, 4)", "BatchNorm2d -> GroupNorm(8, 8)",
        "BatchNorm2d -> GroupNorm(16, 16)", "BatchNorm2d -> GroupNorm(32, 32)"}
    assert len(replacements) == 20 and privgrad.validate(fixed) == []
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched


@contextmanager
def shared_dropout_masks(model: nn.Module, batch: int):
    """Dropout in training mode with one fixed mask per example, used by the batched pass and by
    every one-example reference pass alike."""
    masks, handles = {}, []

    def hook(module, args, output):
        x = args[0]
        if module not in masks:
            masks[module] = torch.bernoulli(torch.full((batch, *x.shape[1:]), 1 - module.p,
                                                       dtype=x.dtype))
        rows = masks[module] if x.shape[0] == batch else masks[module][hook.example:hook.example + 1]
        return x * rows / (1 - module.p)

    hook.example = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            handles.append(m.register_forward_hook(hook))
    try:
        yield hook
    finally:
        for h in handles:
            h.remove()


def case(b=3):
    fixed = privgrad.fix(ResNet18())
    model = fixed.double().train()
    x, y = torch.randn(b, 3, 16, 16, dtype=D), torch.randint(0, 5, (b,))

    def loss(rows, logits):
        return F.cross_entropy(logits, y[rows], reduction="sum")

    return model, (x,), {}, x, loss, b


def test_fixed_resnet_per_sample_gradients_with_dropout_active():
    model, args, kwargs, x, loss, b = case()
    with shared_dropout_masks(model, b) as masks:
        def example(i):
            masks.example = i
            return (x[i:i + 1],), {}

        check_per_sample(model, args, kwargs, example, loss, b, func=False)


def test_fixed_resnet_private_step():
    model, args, kwargs, x, loss, b = case()
    model.eval()  # dropout off: the reference loop's passes draw no masks
    check_private_step(model, args, kwargs, lambda i: ((x[i:i + 1],), {}), loss, b)


def test_fixed_resnet_trains_privately():
    torch.manual_seed(3)
    model = privgrad.fix(ResNet18())
    data = TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert engine.steps == len(loader) and engine.get_epsilon(1e-5) > 0
    assert all(torch.isfinite(p).all() and not torch.equal(p, q)
               for p, q in zip(model.parameters(), before))
