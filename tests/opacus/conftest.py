"""What the ports of Opacus's examples and tutorials share: stand-in data and a way to watch
the engines a script builds without touching the script's code.

Each port keeps the script's privacy-relevant code as it is, with the import line changed to
``privgrad.opacus``; the lines that load real data (torchvision, downloads), pick a GPU, or set
sizes are replaced by stand-ins and marked ``# stand-in``.
"""

from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

import privgrad.opacus as opacus


SCRIPTS = Path(__file__).parent / "scripts"

#: stand-in for ``torchvision.utils``: ``save_image`` writes the tensor with ``torch.save``
tensor_writer = SimpleNamespace(save_image=lambda tensor, fp, **_: torch.save(tensor, fp))


def stand_in_images(n: int, shape: tuple, classes: int = 10, seed: int = 0) -> TensorDataset:
    """``n`` images of ``shape`` whose mean brightness depends on the label (learnable)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = torch.randn(n, *shape, generator=g) * 0.5 + (labels.float() / classes - 0.5).view(
        -1, *[1] * len(shape)) * 2
    return TensorDataset(images, labels)


def stand_in_sentence_pairs(n: int, length: int = 16, vocab: int = 64, seed: int = 0):
    """``TensorDataset(input_ids, attention_mask, token_type_ids, labels)`` as the tutorial's
    SNLI features: two padded segments; the label decides which third of the vocabulary the
    second segment draws from (learnable)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    third = (vocab - 5) // 3
    ids[:, length // 2:] = 5 + labels.view(-1, 1) * third + torch.randint(
        0, third, (n, length - length // 2), generator=g)
    ids[:, 0], ids[:, length // 2 - 1] = 2, 3  # [CLS], [SEP]
    used = torch.randint(length - 4, length + 1, (n, 1), generator=g)
    mask = (torch.arange(length).view(1, -1) < used).long()
    types = (torch.arange(length).view(1, -1) >= length // 2).long().expand(n, -1).clone()
    return TensorDataset(ids * mask, mask, types * mask, labels)


class _Block(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def small_resnet(num_classes: int = 10) -> torch.nn.Module:
    """A stand-in for torchvision's ``resnet18``: a stem, two residual blocks, BatchNorm."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(), _Block(8), _Block(8), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, num_classes))


class Engines:
    """Records every ``privgrad.opacus.PrivacyEngine`` a script builds (``.built``), each with
    its model's state dict as ``make_private`` received it (``.initial``)."""

    def __init__(self, monkeypatch):
        self.built: list[opacus.PrivacyEngine] = []
        self._monkeypatch = monkeypatch
        engines = self

        class Recording(opacus.PrivacyEngine):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                engines.built.append(self)

            def make_private(self, **kwargs):
                self.initial = copy.deepcopy(kwargs["module"].state_dict())
                return super().make_private(**kwargs)

            def make_private_with_epsilon(self, **kwargs):
                self.initial = copy.deepcopy(kwargs["module"].state_dict())
                return super().make_private_with_epsilon(**kwargs)

        self.cls = Recording

    def watch(self, port) -> None:
        """Make ``port`` (a module that imported ``PrivacyEngine``) build recorded engines."""
        self._monkeypatch.setattr(port, "PrivacyEngine", self.cls)


@pytest.fixture
def engines(monkeypatch):
    return Engines(monkeypatch)


@pytest.fixture
def run_main(monkeypatch, tmp_path):
    """``run_main(port, argv)``: the script's ``main()`` with ``sys.argv`` set, in ``tmp_path``
    (scripts write their results to the working directory)."""
    def run(port, argv: list[str]):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", [port.__name__, *argv])
        return port.main()
    return run


@pytest.fixture
def run_script(monkeypatch, tmp_path):
    """``run_script(name, argv)``: run ``scripts/<name>.py`` as ``__main__`` in ``tmp_path``
    with ``sys.argv`` set; returns the script's globals."""
    def run(name: str, argv: list[str] = ()):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
        return runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name="__main__")
    return run


def printed_epsilons(out: str) -> list[float]:
    """The epsilons a script printed as ``(ε = 1.23, ...``, in order."""
    return [float(line.split("ε = ")[1].split(",")[0].rstrip(")"))
            for line in out.splitlines() if "ε = " in line]


def trained(engine) -> bool:
    """The engine's model: every parameter finite, and changed since ``make_private``."""
    before, after = engine.initial, engine.privgrad_engine.module.state_dict()
    finite = all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    return finite and all(not torch.equal(before[k], after[k])
                          for k, p in engine.privgrad_engine.module.named_parameters()
                          if p.requires_grad)
