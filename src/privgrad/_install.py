"""How to install privgrad and its extras, in the one phrasing every message and doc uses.

privgrad has no release on the package index (PyPI) yet, so installing it by name fails (or,
worse, finds someone else's package). Until a release, an extra is installed from a
clone of the repository: ``pip install -e ".[hf]"`` run in the clone. Error messages that name a
missing extra take their install line from ``install_hint()``, so they all change together
on the day of a release. This module imports nothing.
"""

from __future__ import annotations

__all__ = ["install_hint"]


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` (a name in pyproject.toml's optional-dependencies).

    >>> install_hint("hf")
    'pip install -e ".[hf]" in a clone of privgrad (it has no release on PyPI yet)'
    """
    return f'pip install -e ".[{extra}]" in a clone of privgrad (it has no release on PyPI yet)'
