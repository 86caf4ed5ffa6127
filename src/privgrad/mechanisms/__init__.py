"""Correlated noise for DP-SGD: banded matrix factorization (BandMF) and BLT strategies.

The mathematical core of issue 22, independent of the engine: each mechanism gives its strategy
(``coefficients(n)``), its expected error on the training workload (``expected_error(n)``), a
streaming noise generator with exact save and resume (``noise(steps, like)``) and the privacy
event the accountant records (``event(noise_multiplier, sample_rate, steps)``).

>>> from privgrad.mechanisms import BandMF, DPSGD
>>> DPSGD().expected_error(1000)                       # (n + 1) / 2
500.5
>>> round(BandMF(num_bands=16).expected_error(1000), 1)   # doctest: +SKIP
39.4

This package imports torch and privgrad.accounting's events, never the engine, the layers or the
sampling.
"""

from __future__ import annotations

from privgrad.mechanisms.accounting import amplified_event
from privgrad.mechanisms.blt import BLTParameters
from privgrad.mechanisms.strategies import BLT, DPSGD, MECHANISMS, BandMF, MechanismWarning
from privgrad.mechanisms.streaming import BandedNoise, BufferedNoise
from privgrad.mechanisms.toeplitz import WORKLOADS

__all__ = [
    "BLT",
    "DPSGD",
    "MECHANISMS",
    "WORKLOADS",
    "BLTParameters",
    "BandMF",
    "BandedNoise",
    "BufferedNoise",
    "MechanismWarning",
    "amplified_event",
]
