"""The registry of Fisher structures: structure name -> :class:`FisherMatrix` subclass.

The bottom of :mod:`fisherflow.matrices`' imports: it imports nothing from the
package at run time, so the base class registers every subclass here and the file
format (:mod:`fisherflow.matrices.io`) and the collectives
(:mod:`fisherflow.matrices.distributed`) resolve structure names here, without
importing the base class or any structure (no import cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from fisherflow.matrices.base import FisherMatrix

__all__ = ["STRUCTURES", "register"]

#: Structure name -> :class:`~fisherflow.matrices.FisherMatrix` subclass: the one place a
#: structure string is resolved (files, ``all_reduce``, ``fisherflow.estimation``,
#: ``fisherflow.flow``). A subclass that sets ``structure`` registers itself on
#: definition; the six built-in structures (``"dense"``, ``"diagonal"``, ``"block"``,
#: ``"kfac"``, ``"ekfac"``, ``"lowrank"``) are registered once :mod:`fisherflow.matrices`
#: is imported.
STRUCTURES: dict[str, type[FisherMatrix]] = {}


def register(cls: type[FisherMatrix]) -> None:
    """Register ``cls`` under ``cls.structure``.

    Raises:
        TypeError: If ``cls.structure`` is not a non-empty string.
        ValueError: If another class already holds the name.
    """
    name = cls.__dict__.get("structure")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}.structure must be a non-empty string, got {name!r}")
    known = STRUCTURES.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(
            f"structure {name!r} is already registered by {known.__qualname__}; "
            f"registered: {sorted(STRUCTURES)}"
        )
    STRUCTURES[name] = cls
