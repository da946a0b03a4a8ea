"""Validation of optimizer hyperparameters: each error names the argument and the value."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from fisherflow.matrices.validate import check_real

__all__ = ["check_choice", "check_count", "check_damping", "check_fraction", "check_nonnegative"]


def check_nonnegative(value: Any, name: str) -> float:
    """A finite real number ``>= 0``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is negative or not finite.
    """
    out = check_real(value, name)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def check_fraction(value: Any, name: str) -> float:
    """A real number in ``[0, 1)`` (a decay rate).

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is outside ``[0, 1)``.
    """
    out = check_real(value, name)
    if not 0.0 <= out < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return out


def check_count(value: Any, name: str) -> int:
    """A positive integer.

    Raises:
        ValueError: If ``value`` is not an integer ``>= 1``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_damping(value: Any) -> float | Callable[[int], float]:
    """A damping λ ``>= 0`` or a schedule ``step -> λ``.

    Raises:
        TypeError: If ``value`` is neither a real number nor callable.
        ValueError: If a number is negative or not finite.
    """
    if callable(value):
        return value  # type: ignore[no-any-return]
    return check_nonnegative(value, "damping")


def check_choice(value: Any, name: str, choices: dict[str, Any]) -> Any:
    """The entry of ``choices`` for the key ``value``.

    Raises:
        ValueError: If ``value`` is not a key; the error lists the valid keys.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return choices[value]
