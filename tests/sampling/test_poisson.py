"""Row 8 of PRIVACY_TESTS.md: the sampler is Poisson. N = 1,000 records, q = 0.05, 4,000 steps;
every test at alpha = 1e-3 with fixed seeds. Also the exact inclusion threshold and the secure
source."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from privgrad.errors import ConfigError
from privgrad.sampling import PoissonSampler, numpy_bits, os_bits, steps_per_epoch

N, Q, STEPS, ALPHA = 1000, 0.05, 4000, 1e-3


def inclusion_matrix(sampler: PoissonSampler, steps: int) -> np.ndarray:
    m = np.zeros((steps, sampler.num_records), dtype=bool)
    for t in range(steps):
        m[t, sampler.sample()] = True
    return m


def poisson_evidence(m: np.ndarray, q: float) -> dict[str, float]:
    """p-values of the four properties of Poisson sampling for an inclusion matrix."""
    steps, n = m.shape
    sizes = m.sum(1)
    # 1. batch sizes ~ Binomial(n, q): chi-square over bins with expected count >= 5
    lo, hi = stats.binom.ppf(1e-4, n, q), stats.binom.ppf(1 - 1e-4, n, q)
    edges = np.arange(lo, hi + 2)
    observed = np.array([(sizes < lo).sum()] + [(sizes == k).sum() for k in edges[:-1]] + [(sizes > hi).sum()])
    expected = steps * np.array([stats.binom.cdf(lo - 1, n, q)] + [stats.binom.pmf(k, n, q) for k in edges[:-1]]
                                + [stats.binom.sf(hi, n, q)])
    keep = expected >= 5
    observed = np.append(observed[keep], observed[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] < 5:
        observed[-2] += observed[-1]
        expected[-2] += expected[-1]
        observed, expected = observed[:-1], expected[:-1]
    sizes_p = stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue
    # 2. uniform marginals: each record's inclusion count ~ Binomial(steps, q)
    counts = m.sum(0)
    marginal_p = stats.chisquare(counts, np.full(n, counts.mean())).pvalue
    mean_p = 2 * stats.norm.sf(abs(counts.mean() - steps * q) / np.sqrt(steps * q * (1 - q) / n))
    # 3. pairwise co-inclusion q^2 (disjoint pairs, so the pair counts are independent)
    pairs = (m[:, 0::2] & m[:, 1::2]).sum()
    n_pairs = steps * (n // 2)
    pair_p = stats.binomtest(int(pairs), n_pairs, q * q).pvalue
    # 4. serial independence: lag-1 correlation of batch sizes, and of each record's inclusion
    if sizes.std() == 0:
        serial_p = 0.0  # constant batch sizes: certainly not Poisson
    else:
        r = np.corrcoef(sizes[:-1], sizes[1:])[0, 1]
        serial_p = 2 * stats.norm.sf(abs(r) * np.sqrt(steps))
    both = (m[:-1] & m[1:]).sum()
    repeat_p = stats.binomtest(int(both), (steps - 1) * n, q * q).pvalue
    return {"sizes": sizes_p, "marginals": marginal_p, "mean": mean_p, "pairs": pair_p,
            "serial": serial_p, "repeat": repeat_p}


@pytest.mark.slow
def test_numpy_source_is_poisson():
    sampler = PoissonSampler(N, Q, bits=numpy_bits(12345))
    evidence = poisson_evidence(inclusion_matrix(sampler, STEPS), Q)
    assert min(evidence.values()) > ALPHA, evidence


@pytest.mark.slow
def test_secure_source_is_poisson():
    """OS randomness cannot be seeded, so a correct sampler fails one of the six statistics at
    alpha = 1e-3 in about 0.6% of runs. A failure is looked at again on fresh draws: a correct
    sampler fails both in about 4e-5 of runs, while a broken one (power above 0.99 per run)
    fails both almost always."""
    for _ in range(2):
        sampler = PoissonSampler(N, Q, bits=os_bits)
        evidence = poisson_evidence(inclusion_matrix(sampler, STEPS), Q)
        if min(evidence.values()) > ALPHA:
            return
    assert min(evidence.values()) > ALPHA, evidence


def test_fixed_size_shuffling_is_caught():
    """The mutant 'shuffled fixed-size batches instead of Poisson' fails the batch-size test."""
    rng = np.random.default_rng(0)

    class Shuffled(PoissonSampler):
        def sample(self):
            return np.sort(rng.choice(self.num_records, round(self.sample_rate * self.num_records), replace=False))

    m = inclusion_matrix(Shuffled(N, Q, bits=os_bits), 1000)
    assert poisson_evidence(m, Q)["sizes"] < ALPHA


def test_threshold_is_exact():
    # bits that sit just below and at the threshold
    t = int(0.25 * 2**64)
    sampler = PoissonSampler(4, 0.25, bits=lambda n, step: np.array([t - 1, t, 0, 2**64 - 1], dtype=np.uint64))
    assert sampler.sample().tolist() == [0, 2]


def test_rate_one_includes_everything_and_steps_per_epoch():
    assert PoissonSampler(5, 1.0, bits=os_bits).sample().tolist() == [0, 1, 2, 3, 4]
    assert steps_per_epoch(0.01) == 100 and steps_per_epoch(0.3) == 3 and steps_per_epoch(1.0) == 1
    assert len(PoissonSampler(10, 0.1, bits=os_bits)) == 10


def test_seeded_sources_repeat_and_secure_ones_do_not():
    a = PoissonSampler(500, 0.1, bits=numpy_bits(7))
    b = PoissonSampler(500, 0.1, bits=numpy_bits(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c, d = PoissonSampler(500, 0.1, bits=os_bits), PoissonSampler(500, 0.1, bits=os_bits)
    assert not all(np.array_equal(x, y) for x, y in zip(c, d))


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan")])
def test_bad_sample_rate(rate):
    with pytest.raises(ConfigError, match="sample_rate must be in"):
        PoissonSampler(10, rate, bits=os_bits)


def test_empty_data_set_is_refused():
    with pytest.raises(ConfigError, match="num_records must be >= 1"):
        PoissonSampler(0, 0.1, bits=os_bits)


def test_one_more_record_leaves_the_other_inclusions_unchanged():
    a = PoissonSampler(300, 0.1, bits=numpy_bits(5))
    b = PoissonSampler(301, 0.1, bits=numpy_bits(5))
    for x, y in zip(a, b):
        assert y[y < 300].tolist() == x.tolist()
