"""Row 13 of PRIVACY_TESTS.md (secure mode) as checks that raise AssertionError when the property
fails; ``test_secure_noise.py`` runs them on the library and ``test_mutants.py`` on broken
variants.

Secure mode cannot be seeded, so these checks are not deterministic; their false-alarm rate is
the per-p-value alpha of 1e-3 (and 2**-64-scale for the "runs differ" checks).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.privatize.secure import lattice_spacing
from tests.privacy.checks import SIGMA, C, assert_gaussian, forever, zero_gradient_steps


def _secure_run(steps: int, data: TensorDataset, batch_size: int, reduction: str = "sum"):
    """``(p.grad rows per parameter, sampled batches)`` of a secure run with zero gradients."""
    torch.manual_seed(0)  # the same user seed for every run: secure mode must ignore it
    model = nn.Linear(data.tensors[0].shape[1], 25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp", secure_mode=True)
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(data, batch_size=batch_size),
                                   noise_multiplier=SIGMA, max_grad_norm=C, loss_reduction=reduction)
    batches = [b[1].tolist() for _, b in zip(range(steps), forever(dl))]
    grads = zero_gradient_steps(model, optimizer, dl, steps, engine)
    assert engine.accountant.steps == steps and engine.steps == steps
    return grads, batches


def check_secure_noise_distribution(steps: int = 200) -> None:
    """Row 13: secure noise passes row 1's tests (N(0, (sigma C)^2), >= 1,000 coordinates), and
    every released value lies on the lattice that the floating-point hardening promises."""
    data = TensorDataset(torch.randn(100, 40), torch.arange(100))
    grads, _ = _secure_run(steps, data, 10)
    weight = grads["weight"]
    assert weight.shape[1] >= 1000
    assert_gaussian(weight, SIGMA * C, "secure noise: weight")
    assert_gaussian(grads["bias"], SIGMA * C, "secure noise: bias")
    units = weight / lattice_spacing(SIGMA * C)  # loss_reduction="sum": p.grad is the release
    assert np.array_equal(units, np.round(units)), "secure noise is not on the lattice"


def check_secure_runs_differ(steps: int = 20) -> None:
    """Row 13: two secure runs after the same ``torch.manual_seed`` differ, in the noise and in
    the sampled batches."""
    data = TensorDataset(torch.randn(200, 40), torch.arange(200))
    (g1, b1), (g2, b2) = (_secure_run(steps, data, 20) for _ in range(2))
    assert not np.array_equal(g1["weight"], g2["weight"]), "secure noise repeated across runs"
    assert b1 != b2, "secure sampling repeated across runs"
