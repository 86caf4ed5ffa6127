"""Row 13 of PRIVACY_TESTS.md: secure mode (method and limits in privgrad.privatize.secure)."""

from __future__ import annotations

import pytest

from tests.privacy import secure_checks


@pytest.mark.slow
def test_secure_noise_is_gaussian_with_std_sigma_c():
    secure_checks.check_secure_noise_distribution()


def test_two_secure_runs_never_repeat():
    secure_checks.check_secure_runs_differ()
