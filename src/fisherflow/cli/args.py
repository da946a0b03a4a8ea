"""argparse types shared by the subcommands: they reject a bad value by the option's name.

``type=positive_int`` makes ``--batch-size 0`` an argparse error
(``argument --batch-size: must be an integer >= 1, got '0'``, exit status 2).
"""

from __future__ import annotations

import argparse
import math

__all__ = ["HelpFormatter", "positive_float", "positive_int"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends each option with ``(default: X)`` or ``(required)``.

    Flags and options whose default is ``None`` show no default (their help says what
    leaving them out means).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)"
        if action.default is None or isinstance(action.default, bool) or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An integer >= 1.

    Raises:
        argparse.ArgumentTypeError: Otherwise (argparse names the option).

    Example:
        >>> positive_int("3")
        3
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip().lstrip("+"):
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite real number > 0.

    Raises:
        argparse.ArgumentTypeError: Otherwise (argparse names the option).

    Example:
        >>> positive_float("1e-3")
        0.001
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value
