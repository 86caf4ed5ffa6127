"""Watching a private run: a logger hook (epsilon, clip fraction, noise, loss to CSV or
TensorBoard), a progress bar with live epsilon, and a budget stop that ends training before the
step that would exceed a maximum epsilon.

Nothing here changes the training or its guarantee: it reads the engine's public settings, its
accountant (or a copy of it) and the last step's counts.
"""

from __future__ import annotations

from privgrad.monitoring.budget import BudgetStop, epsilon_after
from privgrad.monitoring.logger import PrivacyLogger, progress, step_record

__all__ = ["BudgetStop", "PrivacyLogger", "epsilon_after", "progress", "step_record"]
