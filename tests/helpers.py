"""Small models and data sets shared by the engine-level tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def mlp(d_in=6, hidden=8, d_out=3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def classification_data(n=40, d_in=6, classes=3, seed=0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g))


def loader(dataset: Dataset, batch_size=8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size)


class Indexed(Dataset):
    """A data set whose records are their own indices (to observe the sampling)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i)


def drawn(engine, rows: int) -> None:
    """Tell ``engine`` that the next backward pass's ``rows`` rows are one batch its Poisson
    loader drew. For tests that craft their batches instead of iterating the loader that
    ``make_private`` returned (the engine refuses rows its loader did not draw:
    :mod:`privgrad.engine.rows`)."""
    tracker = engine._rows.drawn
    if tracker is not None:
        tracker.queue(rows)
        tracker.deliver()
