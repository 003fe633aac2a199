"""Checks of hyper-parameters (in the property setters) and of inputs, torchjd-style."""

from __future__ import annotations

import math
from numbers import Integral, Real

from torch import Tensor


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
    if isinstance(value, str) and _is_number(value):
        raise ValueError(
            f"Attribute `{name}` must be a number, not the string {value!r}. (PyYAML reads "
            "1e-8 without a decimal point as a string; aggregator_from_config reads YAML files "
            "as numbers, or write 1.0e-8.)"
        )
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


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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


def check_input(stat: Tensor, owner: object, *, gramian: bool) -> None:
    """
    Raises a ``ValueError`` naming the problem unless ``stat`` is a non-empty floating-point
    matrix (square for a Gramian). Only shapes and dtypes are read: no host synchronisation.
    """

    kind = "Gramian" if gramian else "Jacobian"
    name = type(owner).__name__
    if not isinstance(stat, Tensor):
        raise ValueError(f"`{name}` expects a {kind} tensor. Found {type(stat).__name__}.")
    if stat.ndim != 2:
        raise ValueError(
            f"`{name}` expects a {kind} matrix (2 dimensions). Found shape {tuple(stat.shape)}."
        )
    if not stat.is_floating_point():
        raise ValueError(f"`{name}` expects a floating-point {kind}. Found dtype {stat.dtype}.")
    if gramian and stat.shape[0] != stat.shape[1]:
        raise ValueError(
            f"`{name}` expects a square Gramian (m x m). Found shape {tuple(stat.shape)}."
        )
    if stat.shape[0] == 0:
        raise ValueError(
            f"`{name}` needs at least one task (row). Found shape {tuple(stat.shape)}."
        )
    if stat.shape[1] == 0:
        raise ValueError(
            f"`{name}` needs at least one parameter (column). Found shape {tuple(stat.shape)}."
        )
