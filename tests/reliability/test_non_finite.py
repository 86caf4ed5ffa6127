"""Row 7 end to end: a NaN or inf example never reaches the parameters; it is dropped and
counted (docs/reliability.md explains why dropping, not stopping)."""

from __future__ import annotations

import pytest
import torch

from tests.reliability import checks

BAD = [float("nan"), float("inf")]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_bad_loss_is_dropped_and_counted(bad, clipping):
    checks.check_non_finite_never_reaches_parameters(bad, clipping=clipping)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("dtype, scale", [(torch.bfloat16, None), (torch.float16, 2.0**16)])
def test_bad_loss_under_mixed_precision(bad, dtype, scale):
    checks.check_non_finite_never_reaches_parameters(bad, autocast=dtype, scale=scale, steps=3)
