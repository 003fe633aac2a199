"""Checks run by the property setters of every hyper-parameter, with torchjd-style messages."""

from __future__ import annotations

import math
from numbers import Integral, Real


def check_real(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns ``value`` as a float if it is a finite real number in the given interval."""

    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(
            f"Attribute `{name}` must be a finite real number. Found {name}={value!r}."
        )
    number = float(value)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if too_low or too_high:
        raise ValueError(f"Attribute `{name}` must be in {interval}. Found {name}={value!r}.")
    return number


def check_int(name: str, value: object, *, low: int = 0) -> int:
    """Returns ``value`` if it is an integer not below ``low``."""

    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"Attribute `{name}` must be an integer. Found {name}={value!r}.")
    if value < low:
        raise ValueError(f"Attribute `{name}` must be at least {low}. Found {name}={value!r}.")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """Returns ``value`` if it is a bool."""

    if not isinstance(value, bool):
        raise ValueError(f"Attribute `{name}` must be a bool. Found {name}={value!r}.")
    return value
