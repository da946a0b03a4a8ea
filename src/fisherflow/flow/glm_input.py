"""Reading GLM data: batches of arrays, the design matrix, responses and weights.

Pure functions used by :class:`~fisherflow.flow.OnlineGLM`; numpy arrays, pandas
objects and tensors are accepted, and results go back in the form of the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fisherflow.flow._common import as_float_tensor
from fisherflow.flow.families import Family

__all__ = ["DTYPE", "Batches", "GLMBatch", "design_matrix", "output", "output_kind", "read_batch"]

#: The dtype every GLM statistic is kept in.
DTYPE = torch.float64


class Batches:
    """A re-iterable view of in-memory arrays as ``(X, y, sample_weight)`` batches.

    For :meth:`OnlineGLM.refine` when the data fit in memory anyway; streams from
    disk should pass their own re-iterable (or a callable returning an iterator).

    Args:
        X: Design (array, frame or tensor).
        y: Response.
        sample_weight: Optional weights.
        batch_size: Rows per batch (>= 1).

    Raises:
        ValueError: If ``batch_size`` is not a positive integer or lengths differ.
    """

    def __init__(self, X: Any, y: Any, sample_weight: Any = None, batch_size: int = 1024) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(X) != len(y) or (sample_weight is not None and len(sample_weight) != len(X)):
            raise ValueError(
                f"X, y and sample_weight must have the same length, got {len(X)}, {len(y)}"
            )
        self.X, self.y, self.w, self.batch_size = X, y, sample_weight, batch_size

    def _rows(self, a: Any, i: int) -> Any:
        if a is None:
            return None
        sl = slice(i, i + self.batch_size)
        return a.iloc[sl] if hasattr(a, "iloc") else a[sl]

    def __iter__(self) -> Any:
        for i in range(0, len(self.X), self.batch_size):
            yield self._rows(self.X, i), self._rows(self.y, i), self._rows(self.w, i)

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.batch_size)


def design_matrix(
    X: Any, fit_intercept: bool, feature_names: Sequence[str] | None
) -> tuple[Tensor, list[str]]:
    """The ``(n, p)`` float64 design (constant column first if asked) and column names.

    Raises:
        ValueError: If ``X`` is not 1-D/2-D, not finite, or its width differs from a
            model fitted with ``feature_names``.
    """
    Xt = as_float_tensor(X, "X", DTYPE)
    if Xt.dim() == 1:
        Xt = Xt[:, None]
    if Xt.dim() != 2:
        raise ValueError(f"X must be 2-D (n, features), got {Xt.dim()}-D")
    if hasattr(X, "columns"):
        names = [str(c) for c in X.columns]
    else:
        names = [f"x{i + 1}" for i in range(Xt.shape[1])]
    if fit_intercept:
        Xt = torch.cat([torch.ones(Xt.shape[0], 1, dtype=DTYPE), Xt], dim=1)
        names = ["const", *names]
    if feature_names is not None and Xt.shape[1] != len(feature_names):
        k = len(feature_names) - int(fit_intercept)
        raise ValueError(
            f"X has {Xt.shape[1] - int(fit_intercept)} features, but the model was fitted with {k}"
        )
    return Xt, names


@dataclass(frozen=True)
class GLMBatch:
    """A validated batch.

    Attributes:
        X: ``(n, p)`` design.
        y: ``(n,)`` response (binomial: proportions).
        w: ``(n,)`` prior weights (frequency weights times binomial trials).
        freq: ``(n,)`` frequency weights (observations counted).
        names: Column names of ``X``.
    """

    X: Tensor
    y: Tensor
    w: Tensor
    freq: Tensor
    names: list[str]


def read_batch(
    family: Family,
    X: Any,
    y: Any,
    sample_weight: Any,
    fit_intercept: bool,
    feature_names: Sequence[str] | None,
) -> GLMBatch:
    """Validate one ``(X, y, sample_weight)`` batch for ``family``.

    Raises:
        ValueError: On an empty batch, mismatched lengths, non-finite values, negative
            weights or a response the family does not allow.
    """
    Xt, names = design_matrix(X, fit_intercept, feature_names)
    n = Xt.shape[0]
    if n == 0:
        raise ValueError("X has no rows")
    yt = as_float_tensor(y, "y", DTYPE)
    trials = torch.ones(n, dtype=DTYPE)
    if family.name == "binomial" and yt.dim() == 2 and yt.shape[1] == 2:
        if bool((yt < 0).any()):
            raise ValueError("binomial (successes, failures) must be >= 0")
        trials = yt.sum(1)
        yt = torch.where(trials > 0, yt[:, 0] / trials.clamp_min(1e-300), 0.0)
    elif yt.dim() == 2 and yt.shape[1] == 1:
        yt = yt[:, 0]
    if yt.dim() != 1 or yt.shape[0] != n:
        raise ValueError(f"y must have shape ({n},) to match X, got {tuple(yt.shape)}")
    msg = family.check_y(yt)
    if msg is not None:
        raise ValueError(f"{msg} for family {family.name!r}")
    if sample_weight is None:
        freq = torch.ones(n, dtype=DTYPE)
    else:
        freq = as_float_tensor(sample_weight, "sample_weight", DTYPE).reshape(-1)
        if freq.shape[0] != n:
            raise ValueError(f"sample_weight must have {n} entries, got {freq.shape[0]}")
        if bool((freq < 0).any()):
            raise ValueError("sample_weight must be >= 0")
    return GLMBatch(Xt, yt, freq * trials, freq, names)


def output_kind(X: Any) -> str:
    """``"torch"``, ``"pandas"`` or ``"numpy"``: the form results are returned in."""
    if isinstance(X, Tensor):
        return "torch"
    if hasattr(X, "iloc"):
        return "pandas"
    return "numpy"


def output(arr: Tensor, kind: str, index: Sequence[str] | None = None) -> Any:
    """``arr`` as a tensor, a numpy array or (with ``index``) a pandas Series/DataFrame."""
    if kind == "torch":
        return arr.clone()
    out = arr.detach().cpu().numpy()
    if kind == "pandas" and index is not None:
        import pandas as pd

        if out.ndim == 1:
            return pd.Series(out, index=list(index))
        return pd.DataFrame(out, index=list(index))
    return out
