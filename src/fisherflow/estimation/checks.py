"""Checks of one batch and its model output, with errors that name what is wrong.

Called by the pass on every batch: inputs and outputs must be finite, the output
must carry the batch in dimension 0 (one unbatched sample is not a batch), and
targets of two or more dimensions must too (``(T, B)`` targets for a ``(B, T, V)``
output are refused, not silently reshaped).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fisherflow.estimation.data import tensor_leaves
from fisherflow.matrices.validate import all_finite

__all__ = ["check_inputs", "check_output", "check_total"]


def check_inputs(inputs: Any, index: int) -> None:
    """Raise if a floating-point input tensor of batch ``index`` holds NaN or Inf.

    Raises:
        ValueError: Naming the input and the batch.
    """
    for path, t in tensor_leaves(inputs):
        if t.is_floating_point() or t.is_complex():
            # one reduction decides in the common case (a sum of finite values can
            # overflow: then the full check)
            if not all_finite(t):
                raise ValueError(
                    f"inputs must be finite: {path} of batch {index} (shape "
                    f"{tuple(t.shape)}) contains NaN or Inf"
                )


def check_output(out: Tensor, rows: int, targets: Tensor | None, index: int) -> None:
    """Raise if an output or targets of batch ``index`` lack the batch in dimension 0.

    Raises:
        ValueError: If the output is 0-d or its dimension 0 is not ``rows`` (e.g. one
            sample without a batch dimension), or multi-dimensional targets do not
            have ``rows`` in dimension 0 (e.g. ``(T, B)`` for a ``(B, T, V)`` output).
    """
    if out.dim() == 0 or int(out.shape[0]) != rows:
        raise ValueError(
            f"the model output must have the batch ({rows} rows, dimension 0 of the inputs) "
            f"in dimension 0, got output shape {tuple(out.shape)} in batch {index}; for a "
            "single sample add a batch dimension (x[None])"
        )
    if targets is not None and targets.dim() >= 2 and int(targets.shape[0]) != rows:
        raise ValueError(
            f"targets must have the batch ({rows} rows) in dimension 0, got targets shape "
            f"{tuple(targets.shape)} for output shape {tuple(out.shape)} in batch {index} "
            "(transpose (T, B) targets to (B, T))"
        )


def check_total(total: int, batches: int) -> None:
    """Raise if a pass over ``batches`` batches found no observation at all.

    Raises:
        ValueError: If every target was masked (``-100``).
    """
    if batches and total == 0:
        raise ValueError(
            f"the data has no observation: every target of its {batches} batches is "
            "masked (-100), so there is nothing to estimate from"
        )
