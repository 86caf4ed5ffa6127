"""The DataLoader glue: Poisson batches over the user's data set, empty batches of the right
structure, refusal of sampling that the accounting cannot describe, and virtual batches."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, WeightedRandomSampler

from privgrad.errors import ConfigError
from privgrad.sampling import PoissonSampler, numpy_bits
from privgrad.sampling.loader import check_loader, poisson_loader
from privgrad.sampling.virtual import split_batch

Pair = namedtuple("Pair", "x y")


class DictData(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i)), "y": i, "name": f"r{i}", "pair": Pair(torch.ones(2), i)}


def loader_with_rate(dataset, q, seed=0):
    sampler = PoissonSampler(len(dataset), q, bits=numpy_bits(seed))
    return poisson_loader(DataLoader(dataset, batch_size=2), sampler)


def test_batches_hold_exactly_the_sampled_records():
    data = TensorDataset(torch.arange(50.0).unsqueeze(1), torch.arange(50))
    sampler = PoissonSampler(50, 0.2, bits=numpy_bits(3))
    expected = list(PoissonSampler(50, 0.2, bits=numpy_bits(3)))
    loader = poisson_loader(DataLoader(data, batch_size=10), sampler)
    assert len(loader) == 5
    for (x, y), idx in zip(loader, expected):
        assert y.tolist() == idx.tolist()


def test_empty_batch_keeps_the_structure():
    loader = loader_with_rate(DictData(), 1e-9)  # every batch empty
    batch = next(iter(loader))
    assert batch["x"].shape == (0, 3) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (0,) and batch["name"] == []
    assert isinstance(batch["pair"], Pair) and batch["pair"].x.shape == (0, 2)


def test_tuple_batches_and_empty_tuples():
    data = TensorDataset(torch.randn(8, 4), torch.arange(8))
    x, y = next(iter(loader_with_rate(data, 1e-9)))
    assert x.shape == (0, 4) and y.shape == (0,) and y.dtype == torch.int64


def test_custom_samplers_are_refused():
    data = TensorDataset(torch.randn(8, 2))
    weighted = DataLoader(data, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8))
    with pytest.raises(ConfigError, match="custom sampler.*WeightedRandomSampler"):
        check_loader(weighted, poisson_sampling=True)
    check_loader(weighted, poisson_sampling=False)  # explicitly off: allowed (the engine warns)


def test_iterable_data_sets_are_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(ConfigError, match="IterableDataset"):
        check_loader(DataLoader(Stream(), batch_size=1), poisson_sampling=True)


def test_split_batch_splits_batch_major_leaves_only():
    batch = {"x": torch.arange(10).view(5, 2), "mask": torch.ones(3), "y": torch.arange(5)}
    chunks = split_batch(batch, 2)
    assert [c["y"].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert all(c["mask"].shape == (3,) for c in chunks)
    assert split_batch({"x": torch.zeros(0, 2)}, 2)[0]["x"].shape == (0, 2)
