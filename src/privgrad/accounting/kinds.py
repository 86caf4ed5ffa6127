"""The accountants privgrad offers, by name. This literal is the whole list. No torch."""

from __future__ import annotations

from privgrad import _validate
from privgrad.accounting.accountant import Accountant
from privgrad.accounting.pld import PLDAccountant
from privgrad.accounting.rdp import RDPAccountant

__all__ = ["ACCOUNTANTS", "DEFAULT_ACCOUNTANT", "make_accountant"]

ACCOUNTANTS: dict[str, type[Accountant]] = {
    "pld": PLDAccountant,
    "rdp": RDPAccountant,
}

DEFAULT_ACCOUNTANT = "pld"


def make_accountant(name: str = DEFAULT_ACCOUNTANT) -> Accountant:
    """A fresh accountant of kind ``name``: ``"pld"`` (tight, the default) or ``"rdp"``.

    Raises:
        ConfigError: ``name`` is not one of the offered accountants.
    """
    return ACCOUNTANTS[_validate.choice("accountant", name, ACCOUNTANTS)]()
