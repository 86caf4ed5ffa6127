"""Row 13 of PRIVACY_TESTS.md: secure mode (method and limits in privgrad.privatize.secure)."""

from __future__ import annotations

import pytest

from tests.privacy import secure_checks


@pytest.mark.slow
def test_row13_secure_noise_distribution():
    secure_checks.check_secure_noise_distribution()


def test_row13_two_secure_runs_differ():
    secure_checks.check_secure_runs_differ()
