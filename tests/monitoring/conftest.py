"""A tiny private training run for the monitoring tests."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine


class TinyRun:
    """A linear classifier on 200 random points under DP-SGD (RDP accounting: fast queries)."""

    def __init__(self, max_grad_norm=1.0, noise_multiplier=1.0, accountant="rdp", batch_size=50):
        x, y = torch.randn(200, 5), torch.randint(0, 3, (200,))
        self.model = nn.Linear(5, 3)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.engine = PrivacyEngine(accountant=accountant)
        self.model, self.optimizer, self.loader = self.engine.make_private(
            module=self.model, optimizer=self.optimizer,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)

    def step(self, batch) -> float:
        x, y = batch
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.item()


@pytest.fixture
def tiny_run():
    return TinyRun
