"""``make_private_with_epsilon`` with a correlated mechanism compares it with DP-SGD at the same
epsilon (``mechanism_run.compare_with_dpsgd``) and warns where the mechanism is expected to
leave more noise in the iterates: ``sigma^2 * expected_error(n)`` of each, with DP-SGD's sigma
calibrated independently here on Poisson sampling at the user's rate."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.accounting import get_noise_multiplier
from privgrad.mechanism_run import compare_with_dpsgd
from privgrad.mechanisms import BLT, DPSGD, BandMF, MechanismWarning

N, BATCH, EPOCHS, DELTA = 2000, 100, 10, 1e-5


def attach(mechanism, epsilon: float) -> PrivacyEngine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(N, 3), torch.randint(0, 2, (N,))),
                        batch_size=BATCH)
    engine = PrivacyEngine(accountant="pld")
    engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=loader, target_epsilon=epsilon, target_delta=DELTA, max_grad_norm=1.0,
        epochs=EPOCHS, mechanism=mechanism)
    return engine


def reference_ratio(mechanism, sigma: float, steps: int, epsilon: float) -> float:
    sigma_sgd = get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA,
                                     sample_rate=BATCH / N, steps=steps, accountant="pld")
    baseline = DPSGD(workload=mechanism.workload, momentum=mechanism.momentum)
    return sigma ** 2 * mechanism.expected_error(steps) / (
        sigma_sgd ** 2 * baseline.expected_error(steps))


def test_blt_without_amplification_at_small_epsilon_is_flagged_with_the_numbers():
    blt = BLT(num_buffers=4, workload="momentum", min_sep=N // BATCH)
    with pytest.warns(MechanismWarning) as caught:
        engine = attach(blt, epsilon=1.0)
    message = str(caught[0].message)
    steps, sigma = engine.settings.planned_steps, engine.settings.noise_multiplier
    ratio = reference_ratio(blt, sigma, steps, 1.0)
    assert ratio > 1.1
    assert re.search(rf"at epsilon 1 over {steps} steps .*more noise than DP-SGD", message)
    assert f"({ratio:.2f}x; noise multiplier {sigma:.4g} against" in message
    assert "without amplification by sampling" in message and "privgrad noise" in message
    assert caught[0].filename == __file__  # attributed to the caller of make_private_with_epsilon


def test_bandmf_where_it_pays_trains_without_a_warning():
    bandmf = BandMF(num_bands=4, workload="momentum")
    engine = attach(bandmf, epsilon=8.0)  # warnings are errors in this suite
    steps, sigma = engine.settings.planned_steps, engine.settings.noise_multiplier
    assert reference_ratio(bandmf, sigma, steps, 8.0) < 0.9


def test_the_comparison_returns_the_ratio_and_warns_only_above_one():
    bandmf = BandMF(num_bands=4, workload="momentum")
    common = dict(target_epsilon=8.0, target_delta=DELTA, accountant="pld")
    sigma_sgd = get_noise_multiplier(sample_rate=BATCH / N, steps=200, **common)
    # the same noise as DP-SGD with a strategy of lower error: below one, silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low = compare_with_dpsgd(bandmf, BATCH / N, 200, sigma_sgd, **common)
    assert low == pytest.approx(bandmf.expected_error(200) / DPSGD(
        workload="momentum").expected_error(200), rel=1e-9)
    assert low < 1
    # three times the noise multiplier: nine times the error, above one, warned
    with pytest.warns(MechanismWarning, match=r"BandMF\(num_bands=4"):
        high = compare_with_dpsgd(bandmf, BATCH / N, 200, 3 * sigma_sgd, **common)
    assert high == pytest.approx(9 * low, rel=1e-9)
