"""Data-parallel DP-SGD in real gloo jobs on loopback: the job releases what one process would.

One job runs once per module: ``variance`` on 4 ranks, then ``suite`` on 2 of them (see
``workers.py`` for what each rank does). Every assertion is made here, on their results.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from privgrad import errors
from privgrad.errors import ConfigError
from tests.distributed.launch import launch
from tests.distributed.workers import C, N, NOISE_STEPS, SIGMA, STEPS
from tests.privacy.checks import ALPHA, gaussian_pvalues

STD = SIGMA * C / 10.0  # noise of the averaged update: sigma C / expected batch size

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return launch("all", 4, tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def two(job):
    return [job[r]["suite"] for r in range(2)]


@pytest.fixture(scope="module")
def four(job):
    return [job[r]["variance"] for r in range(4)]


def max_difference(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# -- the same mechanism as one process --------------------------------------------------------
@pytest.mark.parametrize("run", ["plain", "ddp"])
def test_sigma_zero_two_processes_equal_one(two, run):
    """Same logical batches, virtual batches splitting them differently on each rank, rank 1
    starting from another model: the parameters after 8 momentum steps match one process."""
    reference = two[0]["reference"]["params"]
    assert max_difference(two[0][run]["params"], reference) <= 1e-5
    assert max_difference(two[1][run]["params"], two[0][run]["params"]) == 0.0  # in sync
    assert max_difference(reference, [p * 0 for p in reference]) > 1e-2  # it did train
    # data-parallel sums are all-reduced dense; only one process adds sparse rows into noise
    assert two[0]["reference"]["sparse_sums"] and not two[0][run]["sparse_sums"]


def test_noise_is_drawn_once_by_rank_zero(two):
    """sigma > 0: rank 0 draws from the generator a single process would use, nobody else adds
    noise, so the job reproduces the single-process run (noise included)."""
    assert max_difference(two[0]["noisy"]["params"], two[0]["noisy_reference"]["params"]) <= 1e-5
    assert max_difference(two[1]["noisy"]["params"], two[0]["noisy"]["params"]) == 0.0


def test_correlated_noise_is_rank_zeros_and_equals_one_process(two):
    """BandMF(2): the job's cyclic sample, rank 0's noise streams and the accountant's rounds
    are those of one process with the same seed; every rank applies the same update."""
    ref, job = two[0]["bandmf_reference"], two[0]["bandmf"]
    union = [sorted(a + b) for a, b in zip(job["indices"], two[1]["bandmf"]["indices"])]
    assert union == ref["indices"]
    assert max_difference(job["params"], ref["params"]) <= 1e-5
    assert max_difference(two[1]["bandmf"]["params"], job["params"]) == 0.0
    assert job["epsilon"] == ref["epsilon"] == two[1]["bandmf"]["epsilon"]


@pytest.mark.parametrize("run", ["adaptive", "per_layer_adaptive"])
def test_adaptive_clipping_moves_the_bound_as_one_process(two, run):
    """The ranks' counts are added up with the sums and rank 0 alone draws the counts' noise:
    every rank follows the single-process bound(s), and the parameters match it."""
    reference = two[0][run + "_reference"]["bounds"]
    assert len(reference) == STEPS and len({str(b) for b in reference}) == STEPS  # moved each step
    for r in range(2):
        np.testing.assert_allclose(np.array(two[r][run]["bounds"]), np.array(reference), rtol=1e-9)
    assert max_difference(two[0][run]["params"], two[0][run + "_reference"]["params"]) <= 1e-5
    assert max_difference(two[1][run]["params"], two[0][run]["params"]) == 0.0


@pytest.mark.parametrize("run", ["plain", "ddp", "noisy"])
def test_each_example_is_sampled_exactly_once_across_ranks(two, run):
    reference = two[0]["reference" if run != "noisy" else "noisy_reference"]["indices"]
    shares = [two[r][run]["indices"] for r in range(2)]
    assert len(reference) == len(shares[0]) == len(shares[1]) == STEPS
    for step in range(STEPS):
        assert sorted(shares[0][step] + shares[1][step]) == reference[step]
        assert all(i % 2 == r for r in range(2) for i in shares[r][step])
    assert two[0][run]["chunks"] != two[1][run]["chunks"]  # the ranks ran different loops


@pytest.mark.parametrize("run", ["plain", "ddp", "noisy"])
def test_accountant_sees_the_single_process_q_and_steps(two, run):
    reference = two[0]["reference"]
    for r in range(2):
        assert two[r][run]["q"] == reference["q"] == 16 / N
        assert two[r][run]["steps"] == reference["steps"] == STEPS
    assert two[0]["plain"]["epsilon"] == two[1]["plain"]["epsilon"] == reference["epsilon"]
    assert reference["epsilon"] == math.inf  # sigma = 0
    assert two[0]["noisy"]["epsilon"] == two[1]["noisy"]["epsilon"]
    assert two[0]["noisy"]["epsilon"] == two[0]["noisy_reference"]["epsilon"] < math.inf


def test_each_step_reduces_the_clipped_sums_once_and_broadcasts_the_release(two):
    """After make_private, a step's only collective calls are one reduce of as many numbers as
    there are privatised parameters (the clipped sums, to rank 0) and one broadcast of as many
    (rank 0's release): nothing reduced twice, no all-reduce."""
    for r in range(2):
        seen = two[r]["collectives"]
        assert seen["calls"] == [("reduce", seen["numel"]), ("broadcast", seen["numel"])] * 4
        assert seen["steps"] == 4


def test_ddp_sends_no_raw_gradient_and_gets_its_all_reduce_back(two):
    local = [two[r]["ddp_traffic"]["local"] for r in range(2)]
    for r in range(2):
        traffic = two[r]["ddp_traffic"]
        assert traffic["attached_calls"] == []  # attached: DDP's all-reduce sends nothing ...
        assert all(g is None for g in traffic["attached"].values())  # ... nor is a raw one kept
        assert traffic["detached_calls"]  # detached: its all-reduce again (the spy sees it)
    for name in local[0]:
        assert (local[0][name] - local[1][name]).abs().max() > 1e-3  # the ranks' data differ
        for r in range(2):
            detached = two[r]["ddp_traffic"]["detached"][name]
            torch.testing.assert_close(detached, (local[0][name] + local[1][name]) / 2,
                                       rtol=1e-6, atol=1e-7)


def test_secure_mode_release_is_left_on_its_lattice(two):
    """Secure mode snaps (sum + noise) to multiples of L; nothing may be added afterwards. Rank 0
    noises the reduced total, so every coordinate of every rank's update is an exact multiple of
    L. The mutant where rank 0 noises only its own sum before an all-reduce adds rank 1's float
    sum after the snapping, and the check fails."""
    for r in range(2):
        run = two[r]["secure"]
        lattice = run["grads"] / run["spacing"]
        assert torch.equal(lattice, lattice.round())
        assert torch.equal(run["grads"], two[0]["secure"]["grads"])
        assert run["examples"] > 0  # both ranks contributed clipped sums
    mutant = two[0]["secure_mutant"]
    lattice = mutant["grads"] / mutant["spacing"]
    assert (lattice - lattice.round()).abs().max() > 0.1


# -- the noise: the same for world sizes 1, 2 and 4 -------------------------------------------
def world(two, four, size):
    return {1: two[0]["single"], 2: two[0]["noise"], 4: four[0]["noise"]}[size].numpy()


@pytest.mark.parametrize("size", [1, 2, 4])
def test_total_noise_is_gaussian_with_std_sigma_c(two, four, size):
    samples = world(two, four, size)
    assert samples.shape == (NOISE_STEPS, 1025)
    p = gaussian_pvalues(samples, STD)
    assert min(p.values()) > ALPHA, p


@pytest.mark.parametrize("size", [2, 4])
def test_noise_std_matches_one_process(two, four, size):
    """Two-sided F-test of the variance against world size 1 (independent seeds)."""
    a, b = world(two, four, 1), world(two, four, size)
    assert not np.array_equal(a, b)
    ratio = (b ** 2).mean() / (a ** 2).mean()
    p = 2 * min(stats.f.cdf(ratio, b.size, a.size), stats.f.sf(ratio, b.size, a.size))
    assert p > ALPHA, (ratio, p)


@pytest.mark.parametrize("size", [2, 4])
def test_every_rank_applies_the_same_update(two, four, size):
    ranks = two if size == 2 else four
    assert all(torch.equal(r["noise"], ranks[0]["noise"]) for r in ranks)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("mutant", ["full noise on every rank",
                                    "noise split as sigma/sqrt(world) per rank",
                                    "rank 0 adds a sigma/sqrt(world) share"])
def test_the_variance_test_catches_noise_mutants(two, four, size, mutant):
    """Wrong noise designs fail the variance test. Ranks seeded alike (the usual recipe), noise
    drawn on every rank adds up coherently: std times world, or times sqrt(world) when split;
    a share on rank 0 alone is too small by sqrt(world)."""
    samples = (two if size == 2 else four)[0]["mutants"][mutant].numpy()
    assert gaussian_pvalues(samples, STD)["variance"] < ALPHA


# -- bad input that needs a process group -----------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("sigma", r"every rank must call make_private with the same privacy "
              r"configuration; got noise_multiplier=1\.0 on rank 0 and noise_multiplier=1\.25 on "
              r"rank 1\. Pass the same arguments"),
    ("dataset", r"got dataset_size=64 on rank 0 and dataset_size=63 on rank 1\."),
    ("model", r"got parameters=\[\(\(3, 6\), 'torch\.float32'\), \(\(3,\), 'torch\.float32'\)\] "
              r"on rank 0 and parameters=\[\(\(4, 6\)"),
    ("ddp_alone", r"a DistributedDataParallel model needs data-parallel private training .*got "
                  r"distributed=False\. Pass distributed=None"),
    ("poisson_off", r"data-parallel private training needs poisson_sampling=True .*got "
                    r"poisson_sampling=False\."),
    ("ddp_buffers", r"must not broadcast buffers in every forward pass .*got "
                    r"DistributedDataParallel\(broadcast_buffers=True\).*broadcast_buffers=False"),
    ("ddp_hooked", r"privgrad must own the DistributedDataParallel communication hook .*got a "
                   r"model with a communication hook already registered"),
])
def test_refused_on_every_rank_with_the_fix(two, case, message):
    """Each rank saved (error class, message); re-raised here so the check is the usual one."""
    for r in range(2):
        got = two[r]["refusals"][case]
        assert got is not None, f"rank {r} accepted {case}"
        kind, text = got
        with pytest.raises(ConfigError, match=message):
            raise getattr(errors, kind)(text)
