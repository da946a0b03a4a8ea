"""The ``fisherflow`` command: one subcommand per module of this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser and
sets ``func`` (a callable ``args -> exit code``) as a default. ``fisherflow`` and
``python -m fisherflow`` run :func:`main`.

Rules for a subcommand module (``tests/cli/test_help.py`` checks them for every
module in :data:`COMMANDS`):

* **No torch at import time.** ``fisherflow --help`` imports every module in
  ``COMMANDS`` to build the parser; torch (and anything that imports it: numpy-heavy
  libraries, ``fisherflow.matrices`` and the other layers) is imported inside the
  functions that need it, e.g. at the top of ``run(args)``. Type-only imports go
  under ``if TYPE_CHECKING:``.
* **Help that answers.** Pass ``formatter_class=HelpFormatter`` so defaults are
  shown, ``choices=`` (or the names in the help text) for modes, and argparse types
  (``positive_int``, ...) so a bad value is rejected by the option's name; both come
  from :mod:`fisherflow.cli.args`.
* **Errors are one line.** A ``ValueError``, ``TypeError``, ``KeyError``,
  ``FileNotFoundError`` or ``ImportError`` raised by ``run`` is printed as
  ``fisherflow: error: ...`` with exit status 2, without a traceback; raise them with
  messages that name the option and the value received.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

#: Subcommand modules, in the order ``fisherflow --help`` lists them.
COMMANDS = ("demo", "estimate", "inspect", "merge", "prune", "stats")


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
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as err:
        message = str(err).strip() or type(err).__name__
        parser.exit(2, f"fisherflow: error: {' '.join(message.split())}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
