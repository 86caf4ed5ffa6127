"""Argument checks with one error format, shared by every public entry point.

Format: ``<what must hold>; got <name>=<value>. <fix>``. This module imports no torch, so the
accounting package can use it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from privgrad.errors import ConfigError, ConfigTypeError


def fail(requirement: str, name: str, value: object, fix: str) -> ConfigError:
    """Build (not raise) the standard error: ``raise fail(...)``."""
    return ConfigError(f"{requirement}; got {name}={value!r}. {fix}")


def _number(name: str, value: object, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(f"{name} must be a real number; got {name}={value!r}. {fix}")
    return float(value)


def finite_nonnegative(name: str, value: object, fix: str) -> float:
    """``value`` as float, required finite and >= 0."""
    x = _number(name, value, fix)
    if not math.isfinite(x) or x < 0:
        raise fail(f"{name} must be finite and >= 0", name, value, fix)
    return x


def positive(name: str, value: object, fix: str, *, finite: bool = True) -> float:
    """``value`` as float, required > 0 (and finite unless ``finite=False``)."""
    x = _number(name, value, fix)
    if math.isnan(x) or x <= 0 or (finite and math.isinf(x)):
        requirement = f"{name} must be > 0" + (" and finite" if finite else "")
        raise fail(requirement, name, value, fix)
    return x


def open_unit(name: str, value: object, fix: str) -> float:
    """``value`` as float, required in the open interval (0, 1)."""
    x = _number(name, value, fix)
    if not 0 < x < 1:
        raise fail(f"{name} must be in (0, 1)", name, value, fix)
    return x


def unit_interval_right_closed(name: str, value: object, fix: str) -> float:
    """``value`` as float, required in (0, 1]."""
    x = _number(name, value, fix)
    if not 0 < x <= 1:
        raise fail(f"{name} must be in (0, 1]", name, value, fix)
    return x


def _integer(name: str, value: object, fix: str) -> int:
    """``value`` as int (floats such as 3.0 are accepted; bools are not)."""
    if isinstance(value, bool):
        raise ConfigTypeError(f"{name} must be an integer; got {name}={value!r}. {fix}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    raise ConfigTypeError(f"{name} must be an integer; got {name}={value!r}. {fix}")


def nonnegative_int(name: str, value: object, fix: str) -> int:
    """``value`` as int, required an integer >= 0 (floats such as 3.0 are accepted)."""
    n = _integer(name, value, fix)
    if n < 0:
        raise fail(f"{name} must be >= 0", name, value, fix)
    return n


def positive_int(name: str, value: object, fix: str) -> int:
    """``value`` as int, required an integer >= 1 (a negative value is told the same)."""
    n = _integer(name, value, fix)
    if n < 1:
        raise fail(f"{name} must be >= 1", name, value, fix)
    return n


def choice(name: str, value: object, options: Iterable[str]) -> str:
    """``value`` required to be one of ``options`` (strings)."""
    options = tuple(options)
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise fail(f"{name} must be one of {listed}", name, value, f"Pass one of {listed}.")
    return value  # type: ignore[return-value]
