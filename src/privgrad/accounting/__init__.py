"""Privacy accounting for DP-SGD: events, accountants, noise calibration, budget tools.

This package never imports torch (a test checks it), so it serves the command line and
notebooks without a deep-learning stack.

>>> from privgrad.accounting import make_accountant, get_noise_multiplier
>>> acc = make_accountant("pld")
>>> acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000)
>>> round(acc.get_epsilon(delta=1e-5), 2)   # doctest: +SKIP
"""

from __future__ import annotations

from privgrad.accounting.accountant import Accountant
from privgrad.accounting.calibration import epsilon_for, get_max_epochs, get_max_steps, get_noise_multiplier
from privgrad.accounting.events import Composed, HistoryEntry, PoissonGaussian, Repeated, flatten, to_dp_event
from privgrad.accounting.kinds import ACCOUNTANTS, DEFAULT_ACCOUNTANT, make_accountant
from privgrad.accounting.pld import PLDAccountant
from privgrad.accounting.rdp import RDPAccountant

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "Composed",
    "DEFAULT_ACCOUNTANT",
    "HistoryEntry",
    "PLDAccountant",
    "PoissonGaussian",
    "RDPAccountant",
    "Repeated",
    "epsilon_for",
    "flatten",
    "get_max_epochs",
    "get_max_steps",
    "get_noise_multiplier",
    "make_accountant",
    "to_dp_event",
]
