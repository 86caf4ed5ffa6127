"""The Poisson sample split between ranks: exactly once, and still Poisson (no processes)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from privgrad.distributed.sharding import ShardedSampler
from privgrad.errors import ConfigError
from privgrad.sampling import PoissonSampler, numpy_bits

ALPHA = 1e-3
SRC = Path(__file__).resolve().parents[2] / "src" / "privgrad"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_partition_the_global_sample(world_size):
    n, q = 103, 0.2
    ranks = [ShardedSampler(PoissonSampler(n, q, bits=numpy_bits(5)), r, world_size)
             for r in range(world_size)]
    reference = PoissonSampler(n, q, bits=numpy_bits(5))
    for step in range(30):
        shares = [s.sample() for s in ranks]
        union = np.concatenate(shares)
        assert np.array_equal(np.sort(union), reference.sample()), step  # each index once
        for r, share in enumerate(shares):
            assert np.all(share % world_size == r)
    assert all(s.step == 30 for s in ranks)


def test_step_and_bits_read_and_write_through_for_resuming():
    sharded = ShardedSampler(PoissonSampler(50, 0.3, bits=numpy_bits(1)), 1, 2)
    first = [sharded.sample() for _ in range(4)]
    resumed = ShardedSampler(PoissonSampler(50, 0.3, bits=numpy_bits(99)), 1, 2)
    resumed.bits, resumed.step = numpy_bits(1), 2  # what a checkpoint restores
    assert resumed.sampler.step == 2
    assert np.array_equal(resumed.sample(), first[2])
    # the length (steps left in the epoch) and the epoch follow the global sampler
    left = len(sharded.sampler)
    assert len(sharded) == left and sharded.steps == 3
    assert len(list(sharded)) == left and sharded.step % 3 == 0  # it finishes the epoch
    assert sharded.sample_rate == 0.3 and sharded.num_records == 50


def union_pvalues(steps: int = 4000, n: int = 1000, q: float = 0.05, world: int = 2) -> tuple:
    """p-values that the union of independently seeded ranks' shards is a Poisson sample:
    batch sizes ~ Binomial(n, q) (chi-square), every record's marginal q (chi-square over the
    records' counts), consecutive batches independent (their overlap has mean n q^2)."""
    ranks = [ShardedSampler(PoissonSampler(n, q, bits=numpy_bits(10 + r)), r, world)
             for r in range(world)]
    counts = np.zeros(n)
    sizes = np.empty(steps, dtype=int)
    previous, lag = None, []
    for t in range(steps):
        included = np.zeros(n, dtype=bool)
        for s in ranks:
            included[s.sample()] = True
        counts += included
        sizes[t] = included.sum()
        if previous is not None:
            lag.append((included & previous).sum())
        previous = included
    edges = np.arange(stats.binom.ppf(1e-4, n, q), stats.binom.ppf(1 - 1e-4, n, q) + 2)
    observed = np.histogram(sizes, bins=np.concatenate([[-np.inf], edges[1:-1], [np.inf]]))[0]
    cdf = stats.binom.cdf(edges[1:-1] - 1, n, q)
    expected = np.diff(np.concatenate([[0.0], cdf, [1.0]])) * steps
    keep = expected >= 5
    chi2 = (((observed - expected) ** 2 / expected)[keep]).sum()
    p_sizes = stats.chi2.sf(chi2, keep.sum() - 1)
    p_marginal = stats.chi2.sf(((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum(), n)
    lag = np.asarray(lag, dtype=float)
    z = (lag.mean() - n * q * q) / np.sqrt(n * q * q * (1 - q * q) / lag.size)
    return p_sizes, p_marginal, 2 * stats.norm.sf(abs(z))


@pytest.mark.slow
def test_union_of_independently_seeded_shards_is_poisson():
    """Secure mode draws each rank's bits independently: the union must still include every
    record independently with probability q (row 8 of PRIVACY_TESTS.md, for the shards)."""
    p = union_pvalues()
    assert min(p) > ALPHA, p


@pytest.mark.slow
def test_union_test_catches_ranks_that_keep_every_index(monkeypatch):
    """Mutant: ranks draw independently but do not shard, so a record is included with
    probability 1 - (1 - q)^2 (sampled once per rank): the check above must fail."""
    monkeypatch.setattr(ShardedSampler, "own", lambda self, indices: indices)
    p = union_pvalues()
    assert min(p) < ALPHA, p


@pytest.mark.parametrize("rank, world_size, match", [
    (2, 2, "rank must be < world_size"),
    (-1, 2, "rank must be >= 0"),
    (0, 0, "world_size must be >= 1"),
])
def test_bad_rank_or_world_size(rank, world_size, match):
    with pytest.raises(ConfigError, match=match):
        ShardedSampler(PoissonSampler(10, 0.5, bits=numpy_bits(0)), rank, world_size)


def test_only_the_distributed_package_imports_torch_distributed():
    """House rule: ``privgrad.distributed`` is the one place that imports torch.distributed
    (and DDP); everything else reaches it through that package."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "distributed":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith(("torch.distributed", "torch.nn.parallel")):
                    offenders.append(f"{path.relative_to(SRC)}: {name}")
    assert not offenders, offenders
