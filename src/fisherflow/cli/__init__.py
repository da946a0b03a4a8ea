"""The ``fisherflow`` command: one subcommand per module of this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser and
sets ``func`` (a callable ``args -> exit code``) as a default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

#: Subcommand modules, in the order ``fisherflow --help`` lists them.
COMMANDS = ("demo", "estimate", "inspect", "merge", "stats")


def build_parser() -> argparse.ArgumentParser:
    """The top-level argument parser with every subcommand registered."""
    from fisherflow._version import __version__

    parser = argparse.ArgumentParser(
        prog="fisherflow", description="Fisher information for PyTorch models and data."
    )
    parser.add_argument("--version", action="version", version=f"fisherflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"fisherflow.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherflow`` script.

    Errors in what the user passed (a bad argument, a missing or corrupt file) are
    printed as one ``fisherflow: error: ...`` line with exit code 2, not a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        parser.exit(2, f"fisherflow: error: {err}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
