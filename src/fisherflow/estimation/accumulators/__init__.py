"""The accumulators, one per structure, and the one table that builds them.

Each accumulator implements the protocol of
:class:`~fisherflow.estimation.accumulate.Accumulator` and takes its options as
explicit keyword parameters. :data:`ACCUMULATORS` says, per structure string, which
class is built with which options: constants the structure always passes, and
options taken from the estimator (:class:`~fisherflow.estimation.FisherEstimator`'s
``rank``). :func:`make_accumulator` is the only place an accumulator is built from a
structure string; an option an accumulator does not take is a ``TypeError`` naming it.

Example:
    >>> sorted(ACCUMULATORS)
    ['block', 'dense', 'diagonal', 'ekfac', 'kfac', 'lowrank']
    >>> ACCUMULATORS["lowrank"].options  # the estimator's rank becomes the sketch's rank
    {'rank': 'rank'}
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fisherflow.estimation.accumulate import Accumulator, Plan
from fisherflow.estimation.accumulators.diagonal import DiagonalAcc
from fisherflow.estimation.accumulators.ekfac import CorrectionAcc, EKFACAcc
from fisherflow.estimation.accumulators.gram import GroupAcc, LowRankAcc
from fisherflow.estimation.accumulators.kfac import KFACAcc

__all__ = [
    "ACCUMULATORS",
    "ESTIMATOR_OPTIONS",
    "CorrectionAcc",
    "DiagonalAcc",
    "EKFACAcc",
    "GroupAcc",
    "KFACAcc",
    "LowRankAcc",
    "StructureSpec",
    "construct",
    "make_accumulator",
]


@dataclass(frozen=True)
class StructureSpec:
    """How a structure's accumulator is built.

    Attributes:
        accumulator: The accumulator class.
        fixed: Options the structure always passes (``"dense"``: ``dense=True``).
        options: ``{accumulator option: estimator option}`` taken from the estimator.
    """

    accumulator: type[Accumulator]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)


#: The one table from structure strings to accumulators and their options.
ACCUMULATORS: dict[str, StructureSpec] = {
    "diagonal": StructureSpec(DiagonalAcc),
    "dense": StructureSpec(GroupAcc, fixed={"dense": True}),
    "block": StructureSpec(GroupAcc),
    "lowrank": StructureSpec(LowRankAcc, options={"rank": "rank"}),
    "kfac": StructureSpec(KFACAcc),
    "ekfac": StructureSpec(EKFACAcc),
}

#: Estimator options some structure takes (any structure accepts them; each takes
#: those its spec names).
ESTIMATOR_OPTIONS = frozenset(o for s in ACCUMULATORS.values() for o in s.options.values())


#: ``{class: the keyword options it takes}``, read once per class.
_OPTIONS: dict[type[Accumulator], list[str]] = {}


def _options_of(cls: type[Accumulator]) -> list[str]:
    """The keyword options ``cls`` takes besides ``plan`` (read once per class)."""
    takes = _OPTIONS.get(cls)
    if takes is None:
        params = inspect.signature(cls).parameters
        takes = _OPTIONS[cls] = sorted(
            n
            for n, p in params.items()
            if n != "plan" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )
    return takes


def construct(cls: type[Accumulator], plan: Plan, **options: Any) -> Accumulator:
    """``cls(plan, **options)``, after checking that ``cls`` names every option.

    Args:
        cls: An accumulator class.
        plan: What the estimate covers.
        **options: Keyword options of ``cls``.

    Returns:
        The accumulator.

    Raises:
        TypeError: If ``cls`` takes no option of one of the given names.
    """
    takes = _options_of(cls)
    for name in options:
        if name not in takes:
            raise TypeError(f"{cls.__name__} got an unexpected option {name!r}; it takes {takes}")
    return cls(plan, **options)


def make_accumulator(structure: str, plan: Plan, **options: Any) -> Accumulator:
    """The accumulator of ``structure``, with the estimator options its spec names.

    Args:
        structure: A key of :data:`ACCUMULATORS`.
        plan: What the estimate covers.
        **options: Estimator options (of :data:`ESTIMATOR_OPTIONS`); a structure takes
            those its spec names and ignores the others.

    Returns:
        A fresh accumulator.

    Raises:
        ValueError: If ``structure`` is unknown (the error lists the valid keys).
        TypeError: If an option is not an estimator option.
    """
    spec = ACCUMULATORS.get(structure)
    if spec is None:
        raise ValueError(f"structure must be one of {sorted(ACCUMULATORS)}, got {structure!r}")
    for name in options:
        if name not in ESTIMATOR_OPTIONS:
            raise TypeError(
                f"structure {structure!r} got an unexpected option {name!r}; "
                f"estimator options: {sorted(ESTIMATOR_OPTIONS)}"
            )
    chosen = {acc: options[opt] for acc, opt in spec.options.items() if opt in options}
    return construct(spec.accumulator, plan, **spec.fixed, **chosen)
