"""Shared helpers for Fisher Flow: warnings, input checks and the dense pseudo-inverse.

Everything here is private to :mod:`fisherflow.flow`; the warning categories are
re-exported publicly from :mod:`fisherflow.flow`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from fisherflow.matrices import FisherMatrix, ParamLayout, Vector

__all__ = [
    "ConvergenceWarning",
    "RankDeficiencyWarning",
    "SeparationWarning",
    "as_float_tensor",
    "check_flat",
    "check_real",
    "flat_layout",
    "grouped_layout",
    "param_layout",
    "pinv_dense",
]


class SeparationWarning(UserWarning):
    """Binary outcome data are (quasi-)perfectly separated: the MLE does not exist."""


class RankDeficiencyWarning(UserWarning):
    """The information matrix is singular: some parameter directions are not identified."""


class ConvergenceWarning(UserWarning):
    """An iterative fit stopped before meeting its tolerance."""


def check_real(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Validate a finite real number in an interval; return it as ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is not finite or outside the interval.
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    bad = not math.isfinite(x)
    if low is not None:
        bad = bad or (x <= low if low_open else x < low)
    if high is not None:
        bad = bad or (x >= high if high_open else x > high)
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be finite and in {lo}{low}, {high}{hi}, got {x}")
    return x


def as_float_tensor(data: Any, name: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """Convert a numpy array, pandas object, list or tensor to a finite float tensor.

    Raises:
        TypeError: If ``data`` cannot be read as numbers.
        ValueError: If it contains NaN or Inf.
    """
    if isinstance(data, Tensor):
        out = data.detach().to(dtype)
    else:
        values = data.to_numpy() if hasattr(data, "to_numpy") else data
        try:
            arr = np.array(values, dtype=np.float64, copy=True)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be numeric (array, frame or tensor): {err}") from None
        out = torch.from_numpy(arr).to(dtype)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s)")
    return out


def flat_layout(size: int) -> ParamLayout:
    """The layout of a flat parameter vector of ``size`` entries (one block ``"theta"``)."""
    return ParamLayout.from_shapes({"theta": (size,)})


def param_layout(params: object, name: str) -> tuple[ParamLayout, tuple[int, ...] | None]:
    """The layout of parameters given as a tensor or a dict, and the tensor's shape.

    A tensor of any shape is one flat block (:func:`flat_layout`) and keeps its shape
    (results are given back in it); a dict has one block per entry and shape ``None``.

    Raises:
        TypeError: If ``params`` is neither a tensor nor a dict of tensors.

    Example:
        >>> param_layout(torch.zeros(2, 3), "params")[0].size
        6
    """
    if isinstance(params, Mapping):
        for k, v in params.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"{name}[{k!r}] must be a Tensor, got {type(v).__name__}")
        return ParamLayout.from_shapes({k: tuple(v.shape) for k, v in params.items()}), None
    if isinstance(params, Tensor):
        return flat_layout(params.numel()), tuple(params.shape)
    raise TypeError(f"{name} must be a Tensor or a dict of tensors, got {type(params).__name__}")


def grouped_layout(layout: ParamLayout, information: object) -> ParamLayout:
    """``information``'s layout where its groups name the parameters of a flat ``layout``.

    Block, K-FAC and EKFAC information names its parameters in groups, so a flat
    tensor of parameters of the same size is read in that layout; otherwise
    ``layout`` is kept.
    """
    if (
        isinstance(information, FisherMatrix)
        and information.groups()
        and information.size == layout.size
    ):
        return information.layout
    return layout


def check_flat(v: Vector, layout: ParamLayout, name: str, dtype: torch.dtype) -> Tensor:
    """Flatten a parameter vector (tensor or dict) to a finite ``(P,)`` tensor.

    Raises:
        TypeError: If ``v`` is neither a tensor nor a dict of tensors.
        ValueError: If its length or keys do not match ``layout`` or it is not finite.
    """
    if isinstance(v, Mapping):
        flat = layout.flatten(v)
    elif isinstance(v, Tensor):
        flat = v
    else:
        raise TypeError(f"{name} must be a Tensor or a dict of tensors, got {type(v).__name__}")
    if flat.dim() != 1 or flat.shape[0] != layout.size:
        raise ValueError(
            f"{name} must have {layout.size} entries (the layout size), got shape "
            f"{tuple(flat.shape)}"
        )
    if not torch.isfinite(flat).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return flat.detach().to(dtype)


def pinv_dense(info: FisherMatrix, damping: float = 0.0) -> Tensor:
    """The dense ``(P, P)`` pseudo-inverse of ``F + λI`` (``F.pinv_solve`` of the identity).

    The cut-off is the default of :meth:`~fisherflow.matrices.FisherMatrix.pinv_solve`
    (``P · eps``; dense and block on the Jacobi-scaled matrix). O(P²) memory.
    """
    eye = torch.eye(info.size, dtype=info.dtype, device=info.device)
    out = cast(Tensor, info.pinv_solve(eye, damping=damping))  # a tensor in, a tensor out
    return 0.5 * (out + out.T)
