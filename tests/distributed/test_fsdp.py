"""Private training of an FSDP2 (``fully_shard``) model in a real 2-rank gloo job on loopback.

The job runs once per module (``fsdp_workers.py``); every assertion is made here: the sharded
job releases what one process would (sigma = 0: the same parameters; sigma > 0: the same
epsilon, noise of std ``sigma C / normaliser`` per coordinate, independent across shards), and
bad input is refused on every rank.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy import stats

from tests.distributed.fsdp_workers import NOISE_STEPS, SIGMA, C
from tests.distributed.launch import launch
from tests.distributed.workers import STEPS, N
from tests.privacy.checks import ALPHA, gaussian_pvalues

STD = SIGMA * C / 10.0  # expected batch 10: the noise of the averaged update

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    job = launch("fsdp", 2, tmp_path_factory.mktemp("fsdp"), timeout=400,
                 module="tests.distributed.fsdp_workers")
    return [job[r]["fsdp"] for r in range(2)]


def max_difference(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("run", ["sharded", "virtual", "per_layer", "automatic", "rms_norm"])
def test_sigma_zero_the_sharded_update_equals_one_process(two, run):
    """Same logical batches (virtual batches of 3 split the ranks' shares differently; the
    ranks pad to the same number of chunks): after 8 momentum steps the gathered parameters
    match one process with the whole model, to float tolerance (flat, per-layer and automatic
    clipping; the block's norm an nn.RMSNorm instead of an nn.LayerNorm)."""
    reference = two[0][f"{run}_reference" if run in ("per_layer", "automatic", "rms_norm")
                       else "reference"]["params"]
    assert two[0][run]["sharded"] and not two[0]["reference"]["sharded"]
    assert max_difference(two[0][run]["params"], reference) <= 1e-5
    assert max_difference(two[1][run]["params"], two[0][run]["params"]) == 0.0  # one model
    assert max_difference(reference, [p * 0 for p in reference]) > 1e-2  # it did train


def test_mixed_precision_matches_one_process_to_bf16_rounding(two):
    """FSDP2's MixedPrecisionPolicy (bf16 gathered parameters, float32 shards and reductions):
    the same update up to bf16 rounding (the float32 job matches to 1e-5, above)."""
    reference = two[0]["reference"]["params"]
    assert max_difference(two[0]["mixed"]["params"], reference) <= 2e-3
    assert max_difference(two[1]["mixed"]["params"], two[0]["mixed"]["params"]) == 0.0
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4
               for p in two[0]["mixed"]["params"])


def test_secure_mode_shards_are_left_on_their_lattice(two):
    """Secure mode: each rank snaps (its shard of the sum + noise) to multiples of L, and
    nothing is added afterwards, so every coordinate of every shard is an exact multiple."""
    for r in range(2):
        run = two[r]["secure"]
        lattice = run["grads"] / run["spacing"]
        assert len(run["grads"]) == 4 and torch.equal(lattice, lattice.round())


def test_each_example_is_sampled_once_across_ranks(two):
    reference = two[0]["reference"]["indices"]
    assert len(reference) == STEPS
    for step in range(STEPS):
        assert sorted(two[0]["sharded"]["indices"][step] + two[1]["sharded"]["indices"][step]) \
            == reference[step]


def test_epsilon_equals_one_process(two):
    reference = two[0]["noisy_reference"]
    for r in range(2):
        assert two[r]["noisy"]["q"] == reference["q"] == 16 / N
        assert two[r]["noisy"]["steps"] == reference["steps"] == STEPS
        assert two[r]["noisy"]["epsilon"] == reference["epsilon"] < float("inf")
        assert two[r]["noise"]["epsilon"] == two[0]["noise"]["epsilon"]


def test_the_shards_noise_is_reproducible_for_a_seed(two):
    """The same seed gives the same release (each rank's source is seeded from rank 0's seed,
    the rank and the world size); it is not the single-process noise (other draws)."""
    for r in range(2):
        assert max_difference(two[r]["noisy"]["params"], two[r]["noisy_again"]["params"]) == 0.0
    assert max_difference(two[0]["noisy"]["params"], two[0]["noisy_reference"]["params"]) > 1e-3


def test_only_clipped_sums_are_reduce_scattered_after_the_checked_pass(two):
    """After the first (self-checked) pass, a step's reduce-scatters are exactly privgrad's: one
    per parameter, in the model's order, of the parameter's size padded to a multiple of the
    world size; FSDP2 sends nothing (no raw gradient: the norm layer's autograd gradient is
    dropped before FSDP's reduce-scatter). The checked pass has FSDP's too."""
    for r in range(2):
        seen = two[r]["traffic"]
        padded = [-(-shape[0] // 2) * 2 * math.prod(shape[1:]) for shape in seen["shapes"]]
        assert len(seen["steps"]) == 4 and len(padded) == 8
        assert all(step == padded for step in seen["steps"][1:])
        assert len(seen["steps"][0]) > 2 * len(padded)  # FSDP's + the check's + the sums


def test_a_run_resumed_from_a_sharded_checkpoint_continues_exactly(two):
    """Stopped after 4 of the 8 noisy steps, saved (torch.distributed.checkpoint for the model
    and optimizer, engine.state_dict() per rank), resumed in fresh objects built from another
    seed: the same parameters as the uninterrupted run (sampler and every rank's noise stream
    continue), and the same epsilon."""
    for r in range(2):
        assert max_difference(two[r]["resumed"]["params"], two[r]["noisy"]["params"]) <= 1e-6
        assert two[r]["resumed"]["epsilon"] == two[r]["noisy"]["epsilon"]


def test_another_ranks_engine_state_is_refused(two):
    for r in range(2):
        kind, text = two[r]["resumed"]["other_rank"]
        assert kind == "CheckpointError" and (
            f"got {{'rank': {1 - r}, 'world_size': 2}} saved and {{'rank': {r}, 'world_size': 2}} "
            f"here. Load each rank's own engine state") in text


def _whole(two, key="noise", mutant=None):
    runs = [two[r]["mutants"][mutant] if mutant else two[r][key] for r in range(2)]
    return np.concatenate([run["noise"].numpy() for run in runs], axis=1), runs


def _overlap(runs):
    """Rank 0's and rank 1's noise on the weight rows they both have (rows k of each shard)."""
    rows = min(run["weight_rows"] for run in runs)
    return [run["noise"].numpy()[:, :rows * 40].ravel() for run in runs]


def test_noise_per_coordinate_is_sigma_c_over_the_normaliser(two):
    """Zero per-sample gradients, 200 steps x 984 coordinates gathered from both shards:
    N(0, (sigma C / 10)^2) i.i.d. (variance, normality, mean, lag-1); every coordinate has one
    owner (12 + 12 weight rows)."""
    samples, runs = _whole(two)
    assert samples.shape == (NOISE_STEPS, 984)
    assert [run["weight_rows"] for run in runs] == [12, 12]
    p = gaussian_pvalues(samples, STD)
    assert min(p.values()) > ALPHA, p
    assert abs(samples.std() / STD - 1) < 0.02


def test_the_shards_noise_is_independent(two):
    """Rank 0's and rank 1's draws at the same offsets of their shards are uncorrelated."""
    a, b = _overlap(_whole(two)[1])
    assert stats.pearsonr(a, b).pvalue > ALPHA


def test_noise_mutants_are_caught(two):
    """Ranks seeded alike give two shards of one size the same noise (correlation 1, where the
    correct seeds give ~0: the independence test fails); each rank adding
    sigma C / sqrt(world) gives too little noise (the variance test fails)."""
    a, b = _overlap(_whole(two, mutant="ranks seeded alike")[1])
    assert np.corrcoef(a, b)[0, 1] > 0.999 and stats.pearsonr(a, b).pvalue < 1e-12
    samples, _ = _whole(two, mutant="noise split as sigma/sqrt(world) per rank")
    assert gaussian_pvalues(samples, STD)["variance"] < 1e-12
    assert abs(samples.std() / STD - 2**-0.5) < 0.02


@pytest.mark.parametrize("case, message", [
    ("layer_is_a_unit", (r"a layer privgrad clips must run inside a fully_shard block, not be "
                         r"one .*got fully_shard on='1 \(FSDPLinear\)'\. Call fully_shard on "
                         r"the block")),
    ("embedding", (r"under FSDP2 a trainable layer must be served by one of .*got the rule of "
                   r"0\.0='EmbeddingRule'\. Freeze 0\.0")),
    ("root_not_sharded", (r"every trainable parameter of an FSDP2 model must be sharded; got "
                          r"unsharded=\['1\.weight', '1\.bias'\]\. Call fully_shard\(model\)")),
    ("alone", (r"a fully_shard \(FSDP2\) model needs data-parallel private training .*got "
               r"distributed=False")),
    ("sigma", r"got noise_multiplier=1\.0 on rank 0 and noise_multiplier=1\.25 on rank 1"),
    ("adaptive", (r"supports clipping in \('flat', 'per_layer', 'automatic'\); got "
                  r"clipping='adaptive'")),
])
def test_bad_input_is_refused_on_every_rank_with_the_fix(two, case, message):
    for r in range(2):
        kind, text = two[r]["refusals"][case]
        assert kind == "ConfigError" and re.search(message, text), text


def test_the_sharded_self_check_refuses_a_weight_used_outside_its_call(two):
    """A Linear weight used again outside its module's call (a tied head): its per-sample sums
    miss that use, so they do not add up to autograd's gradient; the first step raises on every
    rank before anything is released (the worker checks that no parameter moved)."""
    for r in range(2):
        kind, text = two[r]["refusals"]["tied"]
        assert kind == "PrivacyStateError", text
        assert re.search(r"must add up to autograd's gradient .* sharded parameter\(s\) that do "
                         r"not: 0\.fc\.weight .*Nothing was released", text), text
