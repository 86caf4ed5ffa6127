"""Bad input: one error format (what must hold; got name=value. Fix.), tested message by
message."""

from __future__ import annotations

import pytest
import torch

from privgrad.errors import ConfigError, ConfigTypeError
from privgrad.mechanisms import BLT, DPSGD, BandMF, amplified_event


@pytest.mark.parametrize("value,error,message", [
    (0, ConfigError, (r"num_bands must be >= 1; got num_bands=0\. Pass the number of bands b >= 1 "
                      r"\(b = 1 is DP-SGD\), e\.g\. BandMF\(num_bands=16\)\.")),
    (-3, ConfigError, r"num_bands must be >= 1; got num_bands=-3\."),
    (2.5, ConfigTypeError, r"num_bands must be an integer; got num_bands=2\.5\."),
    ("4", ConfigTypeError, r"num_bands must be an integer; got num_bands='4'\."),
])
def test_num_bands_below_one(value, error, message):
    with pytest.raises(error, match=message):
        BandMF(num_bands=value)


def test_num_bands_above_the_steps():
    message = (r"num_bands must be <= the number of steps \(10\); got num_bands=16\. Pass "
               r"num_bands <= 10, or plan more steps")
    with pytest.raises(ConfigError, match=message):
        BandMF(num_bands=16).coefficients(10)
    with pytest.raises(ConfigError, match=message):
        BandMF(num_bands=16).expected_error(10)
    with pytest.raises(ConfigError, match=message):
        BandMF(num_bands=16).noise(10, torch.zeros(2))
    with pytest.raises(ConfigError, match=message):
        amplified_event(1.0, 0.1, 10, 16)


@pytest.mark.parametrize("make", [lambda: BandMF(4, workload="adam"),
                                  lambda: BLT(2, workload="adam"),
                                  lambda: DPSGD(workload="adam")])
def test_unknown_workload(make):
    with pytest.raises(ConfigError, match=r"workload must be one of 'prefix_sum', 'momentum'; got "
                                          r"workload='adam'\. Pass one of 'prefix_sum', 'momentum'\."):
        make()


@pytest.mark.parametrize("value,requirement", [(1.0, r"momentum must be in \[0, 1\)"),
                                               (1.5, r"momentum must be in \[0, 1\)"),
                                               (-0.1, r"momentum must be finite and >= 0"),
                                               (float("nan"), r"momentum must be finite and >= 0")])
def test_momentum_outside_the_unit_interval(value, requirement):
    with pytest.raises(ConfigError, match=requirement + r"; got momentum=.*\. Pass the optimiser's "
                                          r"momentum \(heavy ball\), e\.g\. 0\.9, or 0\.0 for plain SGD\."):
        BandMF(4, workload="momentum", momentum=value)


@pytest.mark.parametrize("value", [0, -1])
def test_num_buffers_below_one(value):
    with pytest.raises(ConfigError, match=rf"num_buffers must be >= 1; got num_buffers={value}\. "
                                          r"Pass the number of buffers k >= 1, e\.g\. BLT\(num_buffers=4\)\."):
        BLT(num_buffers=value)


def test_min_sep_below_one():
    with pytest.raises(ConfigError, match=r"min_sep must be >= 1; got min_sep=0\. Pass the fewest "
                                          r"steps between two participations"):
        BLT(num_buffers=2, min_sep=0)


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_below_one(steps):
    for call in (BandMF(2).coefficients, DPSGD().expected_error, BLT(2).coefficients):
        with pytest.raises(ConfigError, match=rf"steps must be >= 1; got steps={steps}\. Pass the "
                                              r"total number of training steps"):
            call(steps)


def test_errors_are_value_errors_for_callers_that_catch_those():
    with pytest.raises(ValueError):
        BandMF(num_bands=0)
