"""Cyclic Poisson sampling (the batch selection of amplified BandMF): the participation pattern
(each step inside group t mod b, each record at most once in any b consecutive steps), keyed
groups independent of the order and of N, Poisson
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


KEY = 77  # the group key of the seeded tests


def cyclic(n, p, b, bits, key=KEY, **kw) -> CyclicPoissonSampler:
    return CyclicPoissonSampler(n, p, b, bits=bits, group_key=key, **kw)


def assert_in_group(m: np.ndarray, b: int, groups: np.ndarray) -> None:
    """Raise AssertionError unless every step ``t`` of inclusion matrix ``m`` (steps x N) holds
    only records whose group (``groups``, one per record) is ``t mod b``."""
    steps, n = m.shape
    outside = m & (groups[None, :] != np.arange(steps)[:, None] % b)
    assert not outside.any(), f"records outside their group's steps: {np.argwhere(outside)[:5]}"


def assert_separated(m: np.ndarray, b: int) -> None:
    """Raise AssertionError if a record of inclusion matrix ``m`` (steps x N) appears in two of
    any ``b`` consecutive steps (the participation pattern BandMF's sensitivity assumes; checked
    on the records themselves, whatever the partition)."""
    for lag in range(1, b):
        twice = m[:-lag] & m[lag:]
        assert not twice.any(), f"records drawn twice within {lag} steps: {np.argwhere(twice)[:5]}"


def visits(m: np.ndarray, b: int, group: int, groups: np.ndarray) -> np.ndarray:
    """The group's visits x the group's records: what a Poisson sampler over the group draws
    (an even number of records: ``poisson_evidence`` pairs neighbouring columns; the marginal
    of a dropped last record is still checked over all records)."""
    g = m[group::b][:, groups == group]
    return g[:, : g.shape[1] - g.shape[1] % 2]


@pytest.fixture(scope="module")
def seeded() -> np.ndarray:
    return inclusion_matrix(cyclic(N, P, B, numpy_bits(2024)), STEPS)


GROUPS = cyclic(N, P, B, os_bits).group_of(np.arange(N))


def cyclic_evidence(m: np.ndarray, b: int, p: float, groups: np.ndarray = GROUPS) -> dict[str, float]:
    """p-values: Poisson sampling within each group (sizes ~ Binomial(group size, p), uniform
    marginals, co-inclusion p^2 inside the group, independence across visits), uniform
    marginals over all records, and independent batch sizes from one step to the next."""
    evidence = {f"group {g} {k}": v for g in range(b)
                for k, v in poisson_evidence(visits(m, b, g, groups), p).items()}
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
    assert_in_group(seeded, B, GROUPS)
    assert_separated(seeded, B)
    sampler = cyclic(N, P, B, numpy_bits(2024))
    for t in range(2 * B):
        assert (sampler.group_of(sampler.sample()) == t % B).all()


def test_within_each_group_the_sample_is_poisson(seeded):
    evidence = cyclic_evidence(seeded, B, P)
    assert min(evidence.values()) > ALPHA, {k: v for k, v in evidence.items() if v <= ALPHA}
    # across groups in one step: never both (structural, by the group test above)
    for g, h in [(0, 1), (1, 3)]:
        assert not (seeded[:, GROUPS == g].any(1) & seeded[:, GROUPS == h].any(1)).any()


def test_each_record_is_expected_once_per_epoch():
    assert cyclic_steps_per_epoch(0.2, 4) == 20 and cyclic_steps_per_epoch(1.0, 3) == 3
    sampler = cyclic(1000, 0.05, 8, numpy_bits(1))
    assert sampler.steps == len(sampler) == 160  # 8 groups x 20 visits x 0.05 = once per record
    m = inclusion_matrix(sampler, 160 * 25)
    per_epoch = m.sum(0) / 25
    z = (per_epoch.mean() - 1.0) / np.sqrt(20 * 0.05 * 0.95 / 25 / 1000)
    assert 2 * stats.norm.sf(abs(z)) > ALPHA
    full = cyclic(7, 1.0, 3, os_bits)  # p = 1: every record exactly once
    assert np.array_equal(np.sort(np.concatenate(list(full))), np.arange(7))


def test_secure_source_is_cyclic_poisson():
    """OS randomness cannot be seeded: a failure of a correct sampler (about 2% of runs over
    the 26 checks at alpha = 1e-3) is looked at again on fresh draws, as for
    ``PoissonSampler``; three failures in a row happen to a correct sampler about once in
    10^5 runs."""
    for _ in range(3):
        m = inclusion_matrix(cyclic(N, P, B, os_bits), STEPS)
        assert_in_group(m, B, GROUPS)  # structural: must hold on every run
        assert_separated(m, B)
        evidence = cyclic_evidence(m, B, P)
        if min(evidence.values()) > ALPHA:
            return
    assert min(evidence.values()) > ALPHA, evidence


def test_secure_runs_differ_and_keep_the_pattern():
    a, b = (cyclic(500, 0.3, 5, os_bits) for _ in range(2))
    m, n = inclusion_matrix(a, 200), inclusion_matrix(b, 200)
    for x in (m, n):
        assert_in_group(x, 5, a.group_of(np.arange(500)))
        assert_separated(x, 5)
    assert not np.array_equal(m, n)


def test_one_more_record_leaves_the_other_inclusions_unchanged():
    for b in (1, 3, 4):
        small = cyclic(300, 0.1, b, numpy_bits(5), steps=400)
        large = cyclic(301, 0.1, b, numpy_bits(5), steps=400)
        extra = []
        for t, (x, y) in enumerate(zip(small, large)):
            assert y[y < 300].tolist() == x.tolist()
            if 300 in y:
                extra.append(t)
        assert extra and all(t % b == large.group_of([300])[0] for t in extra), (b, extra)


def test_resume_from_the_step_counter_and_seed_is_exact():
    run = cyclic(400, 0.1, 4, numpy_bits(9))
    first = [run.sample() for _ in range(137)]
    rest = [run.sample() for _ in range(60)]
    resumed = cyclic(400, 0.1, 4, numpy_bits(9))
    resumed.step = 137
    assert len(resumed) == 40 - 137 % 40  # finishes the epoch an uninterrupted run is in
    assert all(np.array_equal(x, y) for x, y in zip(rest, (resumed.sample() for _ in range(60))))
    other = cyclic(400, 0.1, 4, numpy_bits(10))
    assert not all(np.array_equal(x, y) for x, y in zip(first, (other.sample() for _ in range(137))))
    rekeyed = cyclic(400, 0.1, 4, numpy_bits(9), key=KEY + 1)  # another key: other groups
    assert not np.array_equal(rekeyed.group_of(np.arange(400)), run.group_of(np.arange(400)))


@pytest.mark.parametrize("n,rate,seed", [(1, 0.5, 0), (17, 0.3, 7), (1000, 0.05, 12345),
                                         (50, 1.0, 3)])
def test_one_band_is_poisson_sampling_bit_for_bit(n, rate, seed):
    one = cyclic(n, rate, 1, numpy_bits(seed))
    poisson = PoissonSampler(n, rate, bits=numpy_bits(seed))
    assert one.steps == poisson.steps
    for _ in range(3 * poisson.steps):
        assert np.array_equal(one.sample(), poisson.sample())


def test_word_i_of_the_step_decides_record_i_within_its_group():
    t = int(0.25 * 2**64)
    asked = []
    words = np.array([t - 1, t, 0, 2**64 - 1, 5, t + 1, 0], dtype=np.uint64)

    def bits(n, step):
        asked.append((n, step))
        return words[:n]

    sampler = cyclic(7, 0.25, 3, bits)
    groups = sampler.group_of(np.arange(7))
    below = words < np.uint64(t)
    for step in range(3):
        assert sampler.sample().tolist() == np.flatnonzero(below & (groups == step)).tolist()
    assert asked == [(7, 0), (7, 1), (7, 2)]  # every record's word, whatever its group
    assert sampler.members(2).tolist() == np.flatnonzero(groups == 2).tolist()


def test_groups_are_independent_uniform_and_do_not_depend_on_n():
    """Chi-square of the group sizes (uniform), of group against index mod b (a fixed i mod b
    partition fails: the mutant below), and of neighbouring indices' groups (independence);
    the groups of the first N records are those of any longer data set."""
    b, n = 8, 40_000
    groups = cyclic(n, 0.1, b, os_bits, key=2026).group_of(np.arange(n))
    assert stats.chisquare(np.bincount(groups, minlength=b)).pvalue > ALPHA
    assert independence(np.arange(n) % b, groups, b) > ALPHA
    assert independence(groups[:-1], groups[1:], b) > ALPHA
    longer = cyclic(n + 999, 0.1, b, os_bits, key=2026).group_of(np.arange(n + 999))
    assert np.array_equal(longer[:n], groups)
    mutant = np.arange(n) % b  # the fixed partition: order decides the group
    assert independence(np.arange(n) % b, mutant, b) < ALPHA


def independence(x: np.ndarray, y: np.ndarray, b: int) -> float:
    table = np.zeros((b, b))
    np.add.at(table, (x, y), 1)
    return stats.chi2_contingency(table).pvalue


def test_mutant_that_ignores_the_group_fails_the_separation_check():
    """Every record sampled at every step (at the same expected batch size, p / b): records
    then come back within b steps, which the separation check must see."""
    class AllRecords(CyclicPoissonSampler):
        def sample(self):
            step, self.step = self.step, self.step + 1
            return np.flatnonzero(self.bits(self.num_records, step) < self._threshold)

    m = inclusion_matrix(AllRecords(N, P / B, B, bits=numpy_bits(2024), group_key=KEY), 2000)
    with pytest.raises(AssertionError, match="drawn twice within"):
        assert_separated(m, B)
    with pytest.raises(AssertionError, match="outside their group"):
        assert_in_group(m, B, GROUPS)


def test_mutant_with_frozen_words_per_group_fails_serial_independence():
    frozen = cyclic(N, P, B, lambda n, step: numpy_bits(3)(n, step % B))
    evidence = cyclic_evidence(inclusion_matrix(frozen, 1000), B, P)
    assert evidence["group 0 repeat"] < ALPHA


def test_mutant_with_fixed_size_batches_per_group_fails_the_batch_sizes():
    """Cyclic 'sampling' by a fixed number of records per visit (shuffled groups cut into
    batches) is not Poisson within the group."""
    rng = np.random.default_rng(0)

    class FixedSize(CyclicPoissonSampler):
        def sample(self):
            members = self.members(self.step % self.num_groups)
            self.step += 1
            return np.sort(rng.choice(members, round(self.sample_rate * len(members)), replace=False))

    evidence = cyclic_evidence(inclusion_matrix(FixedSize(N, P, B, bits=os_bits, group_key=KEY), 1000), B, P)
    assert evidence["group 0 sizes"] < ALPHA


def test_mutant_with_the_overall_rate_for_the_group_rate_fails_the_mean():
    """q = B / N passed where p = B b / N belongs: batches b times too small."""
    m = inclusion_matrix(cyclic(N, P / B, B, numpy_bits(4)), 1000)
    assert poisson_evidence(visits(m, B, 0, GROUPS), P)["mean"] < ALPHA


@pytest.mark.parametrize("value,error,message", [
    (0, ConfigError, r"num_groups must be >= 1; got num_groups=0\. Pass the number of groups"),
    (-2, ConfigError, r"num_groups must be >= 1; got num_groups=-2\."),
    (2.5, ConfigTypeError, r"num_groups must be an integer; got num_groups=2\.5\. Pass"),
    ("4", ConfigTypeError, r"num_groups must be an integer; got num_groups='4'\."),
    (True, ConfigTypeError, r"num_groups must be an integer; got num_groups=True\."),
    (11, ConfigError, (r"num_groups must be <= num_records \(10\).*; got num_groups=11\. "
                       r"Pass num_groups <= 10")),
])
def test_bad_num_groups(value, error, message):
    with pytest.raises(error, match=message):
        cyclic(10, 0.1, value, os_bits)


def test_other_bad_input():
    assert cyclic(10, 0.1, 10.0, os_bits).num_groups == 10
    assert cyclic(10, 0.1, np.int64(2), os_bits).num_groups == 2
    with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\]; got sample_rate=1\.5"):
        cyclic(10, 1.5, 2, os_bits)
    with pytest.raises(ConfigError, match="num_records must be >= 1; got num_records=0"):
        cyclic(0, 0.1, 1, os_bits)
    with pytest.raises(ConfigError, match="steps must be >= 1; got steps=0"):
        cyclic(10, 0.1, 2, os_bits, steps=0)
    with pytest.raises(ConfigTypeError, match="group_key must be an integer; got group_key=None"):
        cyclic(10, 0.1, 2, os_bits, key=None)
    sampler = cyclic(10, 0.1, 3, os_bits)
    with pytest.raises(ConfigError, match=r"group must be < num_groups \(3\); got group=3"):
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
