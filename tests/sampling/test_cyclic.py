"""Cyclic Poisson sampling (the batch selection of amplified BandMF): the participation pattern
(each step inside group t mod b, each record at most once in any b consecutive steps), Poisson
sampling within each group (row 8 of PRIVACY_TESTS.md, per group), the add-one coupling, exact
resume, the secure source, b = 1 equal to Poisson sampling bit for bit, the errors, and mutants
that the checks must catch. Fixed seeds, alpha = 1e-3."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from privgrad.errors import ConfigError, ConfigTypeError
from privgrad.sampling import PoissonSampler, numpy_bits, os_bits
from privgrad.sampling.cyclic import CyclicPoissonSampler, cyclic_steps_per_epoch
from tests.sampling.test_poisson import inclusion_matrix, poisson_evidence

# N not a multiple of B: groups of 251, 251, 250 and 250 records; 1,000 visits of each group.
N, B, P, STEPS, ALPHA = 1002, 4, 0.2, 4000, 1e-3


def assert_in_group(m: np.ndarray, b: int) -> None:
    """Raise AssertionError unless every step ``t`` of inclusion matrix ``m`` (steps x N) holds
    only records of group ``t mod b``."""
    steps, n = m.shape
    outside = m & (np.arange(n)[None, :] % b != np.arange(steps)[:, None] % b)
    assert not outside.any(), f"records outside their group's steps: {np.argwhere(outside)[:5]}"


def assert_separated(m: np.ndarray, b: int) -> None:
    """Raise AssertionError if a record of inclusion matrix ``m`` (steps x N) appears in two of
    any ``b`` consecutive steps (the participation pattern BandMF's sensitivity assumes; checked
    on the records themselves, whatever the partition)."""
    for lag in range(1, b):
        twice = m[:-lag] & m[lag:]
        assert not twice.any(), f"records drawn twice within {lag} steps: {np.argwhere(twice)[:5]}"


def visits(m: np.ndarray, b: int, group: int) -> np.ndarray:
    """The group's visits x the group's records: what a Poisson sampler over the group draws
    (an even number of records: ``poisson_evidence`` pairs neighbouring columns; the marginal
    of a dropped last record is still checked over all records)."""
    g = m[group::b, group::b]
    return g[:, : g.shape[1] - g.shape[1] % 2]


@pytest.fixture(scope="module")
def seeded() -> np.ndarray:
    return inclusion_matrix(CyclicPoissonSampler(N, P, B, bits=numpy_bits(2024)), STEPS)


def cyclic_evidence(m: np.ndarray, b: int, p: float) -> dict[str, float]:
    """p-values: Poisson sampling within each group (sizes ~ Binomial(group size, p), uniform
    marginals, co-inclusion p^2 inside the group, independence across visits), uniform
    marginals over all records, and independent batch sizes from one step to the next."""
    evidence = {f"group {g} {k}": v for g in range(b)
                for k, v in poisson_evidence(visits(m, b, g), p).items()}
    counts = m.sum(0)  # every group is visited equally often here, so all counts ~ Bin(V, p)
    evidence["all marginals"] = stats.chisquare(counts, np.full(m.shape[1], counts.mean())).pvalue
    sizes = m.sum(1).astype(float)  # centred per group (their sizes differ by one)
    sizes -= np.tile([sizes[g::b].mean() for g in range(b)], len(sizes) // b)
    if sizes.std() == 0:
        evidence["steps serial"] = 0.0  # each group's batch size constant: not Poisson
    else:
        r = np.corrcoef(sizes[:-1], sizes[1:])[0, 1]
        evidence["steps serial"] = 2 * stats.norm.sf(abs(r) * np.sqrt(len(sizes)))
    return evidence


def test_every_step_samples_its_group_and_records_are_b_steps_apart(seeded):
    assert seeded.shape[0] >= 2000
    assert_in_group(seeded, B)
    assert_separated(seeded, B)
    sampler = CyclicPoissonSampler(N, P, B, bits=numpy_bits(2024))
    for t in range(2 * B):
        assert (sampler.group_of(sampler.sample()) == t % B).all()


def test_within_each_group_the_sample_is_poisson(seeded):
    evidence = cyclic_evidence(seeded, B, P)
    assert min(evidence.values()) > ALPHA, {k: v for k, v in evidence.items() if v <= ALPHA}
    # across groups in one step: never both (structural, by the group test above)
    for g, h in [(0, 1), (1, 3)]:
        assert not (seeded[:, g::B].any(1) & seeded[:, h::B].any(1)).any()


def test_each_record_is_expected_once_per_epoch():
    assert cyclic_steps_per_epoch(0.2, 4) == 20 and cyclic_steps_per_epoch(1.0, 3) == 3
    sampler = CyclicPoissonSampler(1000, 0.05, 8, bits=numpy_bits(1))
    assert sampler.steps == len(sampler) == 160  # 8 groups x 20 visits x 0.05 = once per record
    m = inclusion_matrix(sampler, 160 * 25)
    per_epoch = m.sum(0) / 25
    z = (per_epoch.mean() - 1.0) / np.sqrt(20 * 0.05 * 0.95 / 25 / 1000)
    assert 2 * stats.norm.sf(abs(z)) > ALPHA
    full = CyclicPoissonSampler(7, 1.0, 3, bits=os_bits)  # p = 1: every record exactly once
    assert np.array_equal(np.sort(np.concatenate(list(full))), np.arange(7))


def test_secure_source_is_cyclic_poisson():
    """OS randomness cannot be seeded: a failure of a correct sampler (about 2% of runs over
    the 26 checks at alpha = 1e-3) is looked at again on fresh draws, as for
    ``PoissonSampler``; three failures in a row happen to a correct sampler about once in
    10^5 runs."""
    for _ in range(3):
        m = inclusion_matrix(CyclicPoissonSampler(N, P, B, bits=os_bits), STEPS)
        assert_in_group(m, B)  # structural: must hold on every run
        assert_separated(m, B)
        evidence = cyclic_evidence(m, B, P)
        if min(evidence.values()) > ALPHA:
            return
    assert min(evidence.values()) > ALPHA, evidence


def test_secure_runs_differ_and_keep_the_pattern():
    a, b = (CyclicPoissonSampler(500, 0.3, 5, bits=os_bits) for _ in range(2))
    m, n = inclusion_matrix(a, 200), inclusion_matrix(b, 200)
    for x in (m, n):
        assert_in_group(x, 5)
        assert_separated(x, 5)
    assert not np.array_equal(m, n)


def test_one_more_record_leaves_the_other_inclusions_unchanged():
    for b in (1, 3, 4):
        small = CyclicPoissonSampler(300, 0.1, b, bits=numpy_bits(5), steps=400)
        large = CyclicPoissonSampler(301, 0.1, b, bits=numpy_bits(5), steps=400)
        extra = []
        for t, (x, y) in enumerate(zip(small, large)):
            assert y[y < 300].tolist() == x.tolist()
            if 300 in y:
                extra.append(t)
        assert extra and all(t % b == 300 % b for t in extra), (b, extra)


def test_resume_from_the_step_counter_and_seed_is_exact():
    run = CyclicPoissonSampler(400, 0.1, 4, bits=numpy_bits(9))
    first = [run.sample() for _ in range(137)]
    rest = [run.sample() for _ in range(60)]
    resumed = CyclicPoissonSampler(400, 0.1, 4, bits=numpy_bits(9))
    resumed.step = 137
    assert len(resumed) == 40 - 137 % 40  # finishes the epoch an uninterrupted run is in
    assert all(np.array_equal(x, y) for x, y in zip(rest, (resumed.sample() for _ in range(60))))
    other = CyclicPoissonSampler(400, 0.1, 4, bits=numpy_bits(10))
    assert not all(np.array_equal(x, y) for x, y in zip(first, (other.sample() for _ in range(137))))


@pytest.mark.parametrize("n,rate,seed", [(1, 0.5, 0), (17, 0.3, 7), (1000, 0.05, 12345),
                                         (50, 1.0, 3)])
def test_one_band_is_poisson_sampling_bit_for_bit(n, rate, seed):
    cyclic = CyclicPoissonSampler(n, rate, 1, bits=numpy_bits(seed))
    poisson = PoissonSampler(n, rate, bits=numpy_bits(seed))
    assert cyclic.steps == poisson.steps
    for _ in range(3 * poisson.steps):
        assert np.array_equal(cyclic.sample(), poisson.sample())


def test_word_j_of_the_step_decides_record_g_plus_j_b():
    t = int(0.25 * 2**64)
    asked = []

    def bits(n, step):
        asked.append((n, step))
        return np.array([t - 1, t, 0, 2**64 - 1][:n], dtype=np.uint64)

    sampler = CyclicPoissonSampler(11, 0.25, 3, bits=bits)  # groups {0,3,6,9} {1,4,7,10} {2,5,8}
    assert [sampler.sample().tolist() for _ in range(3)] == [[0, 6], [1, 7], [2, 8]]
    assert asked == [(4, 0), (4, 1), (3, 2)]  # only the step's group's words
    assert sampler.members(2).tolist() == [2, 5, 8]
    assert sampler.group_of([0, 4, 11, 302]).tolist() == [0, 1, 2, 2]


def test_mutant_that_ignores_the_group_fails_the_separation_check():
    """Every record sampled at every step (at the same expected batch size, p / b): records
    then come back within b steps, which the separation check must see."""
    class AllRecords(CyclicPoissonSampler):
        def sample(self):
            step, self.step = self.step, self.step + 1
            return np.flatnonzero(self.bits(self.num_records, step) < self._threshold)

    m = inclusion_matrix(AllRecords(N, P / B, B, bits=numpy_bits(2024)), 2000)
    with pytest.raises(AssertionError, match="drawn twice within"):
        assert_separated(m, B)
    with pytest.raises(AssertionError, match="outside their group"):
        assert_in_group(m, B)


def test_mutant_with_frozen_words_per_group_fails_serial_independence():
    frozen = CyclicPoissonSampler(N, P, B, bits=lambda n, step: numpy_bits(3)(n, step % B))
    evidence = cyclic_evidence(inclusion_matrix(frozen, 1000), B, P)
    assert evidence["group 0 repeat"] < ALPHA


def test_mutant_with_fixed_size_batches_per_group_fails_the_batch_sizes():
    """Cyclic 'sampling' by a fixed number of records per visit (shuffled groups cut into
    batches) is not Poisson within the group."""
    rng = np.random.default_rng(0)

    class FixedSize(CyclicPoissonSampler):
        def sample(self):
            members = self.members(self.step % self.num_bands)
            self.step += 1
            return np.sort(rng.choice(members, round(self.sample_rate * len(members)), replace=False))

    evidence = cyclic_evidence(inclusion_matrix(FixedSize(N, P, B, bits=os_bits), 1000), B, P)
    assert evidence["group 0 sizes"] < ALPHA


def test_mutant_with_the_overall_rate_for_the_group_rate_fails_the_mean():
    """q = B / N passed where p = B b / N belongs: batches b times too small."""
    m = inclusion_matrix(CyclicPoissonSampler(N, P / B, B, bits=numpy_bits(4)), 1000)
    assert poisson_evidence(visits(m, B, 0), P)["mean"] < ALPHA


@pytest.mark.parametrize("value,error,message", [
    (0, ConfigError, r"num_bands must be >= 1; got num_bands=0\. Pass the number of groups"),
    (-2, ConfigError, r"num_bands must be >= 1; got num_bands=-2\."),
    (2.5, ConfigTypeError, r"num_bands must be an integer; got num_bands=2\.5\. Pass"),
    ("4", ConfigTypeError, r"num_bands must be an integer; got num_bands='4'\."),
    (True, ConfigTypeError, r"num_bands must be an integer; got num_bands=True\."),
    (11, ConfigError, (r"num_bands must be <= num_records \(10\).*; got num_bands=11\. "
                       r"Pass num_bands <= 10")),
])
def test_bad_num_bands(value, error, message):
    with pytest.raises(error, match=message):
        CyclicPoissonSampler(10, 0.1, value, bits=os_bits)


def test_other_bad_input():
    assert CyclicPoissonSampler(10, 0.1, 10.0, bits=os_bits).num_bands == 10
    assert CyclicPoissonSampler(10, 0.1, np.int64(2), bits=os_bits).num_bands == 2
    with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\]; got sample_rate=1\.5"):
        CyclicPoissonSampler(10, 1.5, 2, bits=os_bits)
    with pytest.raises(ConfigError, match="num_records must be >= 1; got num_records=0"):
        CyclicPoissonSampler(0, 0.1, 1, bits=os_bits)
    with pytest.raises(ConfigError, match="steps must be >= 1; got steps=0"):
        CyclicPoissonSampler(10, 0.1, 2, bits=os_bits, steps=0)
    sampler = CyclicPoissonSampler(10, 0.1, 3, bits=os_bits)
    with pytest.raises(ConfigError, match=r"group must be < num_bands \(3\); got group=3"):
        sampler.members(3)
    with pytest.raises(ConfigError, match=r"indices must be >= 0; got min\(indices\)=-1"):
        sampler.group_of([-1, 2])
    with pytest.raises(ConfigTypeError, match="indices must be integers"):
        sampler.group_of([0.5])


def test_importing_loads_no_torch():
    code = ("import sys, privgrad.sampling.cyclic\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]"
