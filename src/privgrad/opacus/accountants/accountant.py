"""Opacus's accountant classes over privgrad's accountants (``privgrad.accounting``).

Each Opacus accountant is a view over one privgrad accountant, which does the arithmetic:
``"rdp"`` over ``privgrad.RDPAccountant``; ``"prv"`` (Opacus's default) and ``"gdp"`` over
``privgrad.PLDAccountant``. privgrad has no PRV or GDP accountant of its own: PLD is, like
PRV, a tight numerical accountant (the two agree to within their discretisation), and it
replaces GDP's central-limit approximation, which can understate epsilon, by a bound. The first
use of ``"prv"`` or ``"gdp"`` in a process says so once on the ``privgrad`` logger (INFO).

What Opacus code reads is here: ``step``, ``get_epsilon``, ``history`` (a list of
``(noise_multiplier, sample_rate, num_steps)``), ``len()`` (the number of history entries, as in
Opacus), ``mechanism()``, ``state_dict``/``load_state_dict``, ``get_optimizer_hook_fn`` and, for
RDP, ``get_privacy_spent``.
"""

from __future__ import annotations

import logging

from privgrad import _validate
from privgrad.accounting import Accountant, make_accountant
from privgrad.errors import PrivacyStateError

__all__ = ["MECHANISMS", "GaussianAccountant", "IAccountant", "PRVAccountant", "RDPAccountant",
           "create_accountant", "privgrad_kind"]

_log = logging.getLogger("privgrad")

#: Opacus mechanism name -> the privgrad accountant that serves it.
MECHANISMS = {"prv": "pld", "rdp": "rdp", "gdp": "pld", "pld": "pld"}

_NOTED: set[str] = set()  # mechanisms whose substitution this process has logged

# Keyword arguments of Opacus's get_epsilon that tune its own numerics; privgrad's accountants
# have their own (documented) precision, so these are accepted and have no effect.
_NUMERIC_KEYWORDS = frozenset({"eps_error", "delta_error", "poisson", "alphas"})


def privgrad_kind(mechanism: str) -> str:
    """The privgrad accountant (``"pld"`` or ``"rdp"``) serving Opacus's ``mechanism``."""
    _validate.choice("accountant", mechanism, MECHANISMS)
    kind = MECHANISMS[mechanism]
    if kind != mechanism and mechanism not in _NOTED:
        _NOTED.add(mechanism)
        _log.info("privgrad.opacus: accountant=%r is served by privgrad's PLD accountant (a tight "
                  "numerical accountant; see docs/migration.md)", mechanism)
    return kind


class IAccountant:
    """An Opacus accountant over one privgrad accountant.

    Args:
        accountant: the privgrad accountant to read and record into; a fresh one of this
            class's mechanism by default.

    Privacy:
        The view adds no arithmetic: epsilon is the privgrad accountant's (see
        ``privgrad.accounting``), for the steps recorded in it.
    """

    MECHANISM = "pld"

    def __init__(self, accountant: Accountant | None = None):
        self._core = accountant if accountant is not None else make_accountant(
            privgrad_kind(self.MECHANISM))

    @classmethod
    def mechanism(cls) -> str:
        """Opacus's name of this accountant (``"prv"``, ``"rdp"``, ``"gdp"``)."""
        return cls.MECHANISM

    @property
    def privgrad_accountant(self) -> Accountant:
        """The privgrad accountant doing the work."""
        return self._core

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step (see ``privgrad.accounting.Accountant.step``)."""
        self._core.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def get_epsilon(self, delta: float, **numerics) -> float:
        """Epsilon of the recorded steps at ``delta``. Opacus's precision keywords
        (``eps_error``, ``delta_error``, ``poisson``, ``alphas``) are accepted and unused."""
        unknown = sorted(set(numerics) - _NUMERIC_KEYWORDS)
        if unknown:
            raise _validate.fail("get_epsilon takes delta and Opacus's precision keywords only",
                                 "keywords", unknown, "Pass get_epsilon(delta).")
        return self._core.get_epsilon(delta)

    @property
    def history(self) -> list:
        """``[(noise_multiplier, sample_rate, num_steps), ...]``, equal consecutive steps
        merged (a new list each read)."""
        return list(self._core.history)

    @history.setter
    def history(self, entries) -> None:
        state = self._core.state_dict()
        state["history"] = [list(entry) for entry in entries]
        self._core.load_state_dict(state)  # checks every entry before changing anything

    def __len__(self) -> int:
        """The number of history entries (Opacus's ``len``; not the number of steps)."""
        return len(self._core.history)

    def state_dict(self, destination: dict | None = None) -> dict:
        """privgrad's accountant state (plain data), merged into ``destination`` if given."""
        state = self._core.state_dict()
        if destination is None:
            return state
        destination.update(state)
        return destination

    def load_state_dict(self, state_dict: dict) -> None:
        """Replace the history by one from ``state_dict`` (of the same mechanism)."""
        self._core.load_state_dict(state_dict)

    def get_optimizer_hook_fn(self, sample_rate: float):
        """A step hook for ``privgrad.opacus.optimizers.DPOptimizer.attach_step_hook``: it
        records one step at the optimizer's ``noise_multiplier`` and ``sample_rate``."""
        sample_rate = _validate.unit_interval_right_closed(
            "sample_rate", sample_rate, "Pass the Poisson inclusion probability.")

        def hook_fn(optimizer) -> None:
            self.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=sample_rate)

        return hook_fn

    def __repr__(self) -> str:
        return f"{type(self).__name__}(over {self._core!r})"


class RDPAccountant(IAccountant):
    """Opacus's ``RDPAccountant`` over ``privgrad.RDPAccountant``."""

    MECHANISM = "rdp"

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
        """``(epsilon, best order)`` at ``delta``, over privgrad's RDP orders (Opacus's
        ``alphas`` are accepted and unused: privgrad's orders are a superset of Opacus's)."""
        from dp_accounting.rdp import rdp_privacy_accountant as rdp

        epsilon = self._core.get_epsilon(delta)
        if not self._core.history:
            return epsilon, float("nan")
        _, order = rdp.compute_epsilon(self._core.orders, self._core.rdp, delta)
        return epsilon, float(order)


class PRVAccountant(IAccountant):
    """Opacus's default accountant name, served by ``privgrad.PLDAccountant``."""

    MECHANISM = "prv"


class GaussianAccountant(IAccountant):
    """Opacus's ``"gdp"`` name, served by ``privgrad.PLDAccountant`` (a bound, where GDP's
    central-limit approximation can understate epsilon)."""

    MECHANISM = "gdp"


class _PLDAccountant(IAccountant):
    """privgrad's own name, ``"pld"``, accepted where Opacus takes a mechanism name."""

    MECHANISM = "pld"


_CLASSES = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant,
            "pld": _PLDAccountant}


def create_accountant(mechanism: str) -> IAccountant:
    """A fresh Opacus accountant by name (``"prv"``, ``"rdp"``, ``"gdp"``; ``"pld"`` too)."""
    _validate.choice("accountant", mechanism, MECHANISMS)
    return _CLASSES[mechanism]()


class EngineAccountant(IAccountant):
    """The accountant of a ``privgrad.opacus.PrivacyEngine``: a view over its privgrad
    engine's accountant, which records every released step.

    Privacy:
        The history is the record of what the engine released, so it cannot be assigned
        (Opacus allows ``accountant.history = ...``); ``step`` can add steps, which only raises
        epsilon.
    """

    def __init__(self, engine, mechanism: str):
        self._engine = engine
        self.MECHANISM = mechanism  # an instance attribute: mechanism() is a classmethod

    @property
    def _core(self) -> Accountant:  # read each time: the engine owns it
        return self._engine.accountant

    def mechanism(self) -> str:  # type: ignore[override]
        return self.MECHANISM

    @property
    def history(self) -> list:
        return list(self._core.history)

    @history.setter
    def history(self, entries) -> None:
        raise PrivacyStateError(
            "the engine's accountant history is the record of the steps it released; got an "
            "assignment to privacy_engine.accountant.history. Load a saved run with "
            "load_checkpoint, or build a separate accountant (privgrad.opacus.accountants."
            "create_accountant) to experiment.")
