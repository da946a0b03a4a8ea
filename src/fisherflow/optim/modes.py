"""The string modes of the optimizers, each a dict whose error lists the valid keys.

``REDUCTIONS`` (which Fisher preconditions a loss reduction), ``DAMPING_MODES`` (how
damping enters a solve) and ``NONFINITE`` (what a non-finite gradient, curvature or
step does: the step is never taken), and :class:`StepCounts`, the step and skip counts
every optimizer keeps with it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fisherflow.matrices import KFAC as KFACMatrix
from fisherflow.matrices import FisherMatrix
from fisherflow.optim.checks import check_choice
from fisherflow.optim.damping import factored_damping

__all__ = ["DAMPING_MODES", "NONFINITE", "REDUCTIONS", "StepCounts", "inside_estimation"]

#: The preconditioner of a loss reduction: the per-observation or the summed Fisher.
REDUCTIONS: dict[str, Callable[[FisherMatrix], FisherMatrix]] = {
    "mean": lambda fisher: fisher.mean(),
    "sum": lambda fisher: fisher,
}


def _exact(fisher: FisherMatrix, damping: float) -> tuple[FisherMatrix, float]:
    return fisher, damping


def _factored(fisher: FisherMatrix, damping: float) -> tuple[FisherMatrix, float]:
    if not isinstance(fisher, KFACMatrix):
        raise TypeError(f"factored damping needs a K-FAC curvature, got {fisher.structure!r}")
    return factored_damping(fisher, damping), 0.0


#: How damping enters the solve, as ``(F, λ) -> (matrix, damping to solve with)``:
#: ``(F + λI)⁻¹ g`` exactly, or K-FAC's factored (π) damping inside the factors.
DAMPING_MODES: dict[str, Callable[[FisherMatrix, float], tuple[FisherMatrix, float]]] = {
    "exact": _exact,
    "factored": _factored,
}


#: Frames a warning skips to reach the user's line: fisherflow's and torch's own
#: wrappers of ``step`` (``no_grad``, the optimizer's profiling hook).
_LIBRARY_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.path.dirname(os.path.abspath(torch.__file__)),
)


def _warn(what: str) -> None:
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _LIBRARY_DIRS
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"non-finite {what}: the step was skipped", RuntimeWarning, stacklevel=level)


def _raise(what: str) -> None:
    raise FloatingPointError(f"non-finite {what}: the step was not taken")


#: What a non-finite gradient, curvature or step does (the step is never taken).
NONFINITE: dict[str, Callable[[str], None]] = {"warn": _warn, "raise": _raise}


class StepCounts:
    """Steps taken and skipped by an optimizer that never applies a non-finite step.

    Shared by :class:`~fisherflow.optim.NaturalGradient` and the Kronecker-factored
    optimizers: the ``nonfinite`` mode, the two counts, and their place in a state dict.
    """

    _step: int
    _skipped: int

    def _init_counts(self, nonfinite: str) -> None:
        self._on_nonfinite = check_choice(nonfinite, "nonfinite", NONFINITE)
        self.nonfinite = nonfinite
        self._step, self._skipped = 0, 0

    @property
    def steps(self) -> int:
        """Steps taken (skipped ones not counted)."""
        return self._step

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite gradient (or curvature, or step)."""
        return self._skipped

    def _skip(self, what: str) -> None:
        """Count a skipped step and warn (or raise) about the non-finite ``what``."""
        self._skipped += 1
        self._on_nonfinite(what)

    def _counts(self) -> dict[str, int]:
        return {"step": self._step, "skipped": self._skipped}

    def _load_counts(self, state: dict[str, Any]) -> None:
        self._step, self._skipped = int(state["step"]), int(state["skipped"])


#: fisherflow's estimation package: a forward called from it is not a training batch.
_ESTIMATION_DIR = os.path.join(_LIBRARY_DIRS[0], "estimation")


def inside_estimation() -> bool:
    """Whether the current call comes from fisherflow's estimation code.

    A forward of the model run by :func:`~fisherflow.estimate`,
    :func:`~fisherflow.reference_fisher` or an estimator is not one of the user's
    training micro-batches, so the optimizers' input recorders skip it.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_ESTIMATION_DIR):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False
