"""``import privgrad`` stays cheap: dp_accounting (which pulls in scipy.signal, a second or more)
is imported when an accountant first computes, never at import.

Speed itself is measured, not asserted (GUIDE rule 12); what makes it fast is asserted: the heavy
modules are absent from ``sys.modules`` after the imports users write.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from privgrad.accounting.rdp import DEFAULT_ORDERS

HEAVY = "sorted(m for m in sys.modules if m.split('.')[0] in ('dp_accounting', 'scipy'))"


def loaded_after(code: str) -> list[str]:
    """The heavy modules loaded by ``code`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint({HEAVY})"],
                          capture_output=True, text=True, check=True, timeout=300)
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "from privgrad import PrivacyEngine",
    "import privgrad.accounting as a; a.make_accountant('pld'); a.make_accountant('rdp')",
    "from privgrad.monitoring import PrivacyLogger, BudgetStop",
    "from privgrad.cli import build_parser; build_parser()",
])
def test_importing_privgrad_does_not_import_dp_accounting_or_scipy(code):
    assert loaded_after(code) == []


def test_the_first_computation_imports_them():
    """The probe above can see them: an accountant that computes does load dp_accounting."""
    loaded = loaded_after("import privgrad.accounting as a\n"
                          "acc = a.make_accountant('rdp'); acc.step(noise_multiplier=1.0, sample_rate=0.01)\n"
                          "acc.get_epsilon(1e-5)")
    assert "dp_accounting" in loaded and "scipy" in loaded


def test_default_orders_are_dp_accountings():
    """Written out so that importing rdp.py needs no dp_accounting; they must stay its defaults."""
    from dp_accounting.rdp import rdp_privacy_accountant

    assert DEFAULT_ORDERS == tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    assert all(isinstance(a, float) for a in DEFAULT_ORDERS)
