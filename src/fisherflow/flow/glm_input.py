"""Reading GLM data: batches of arrays, the design matrix, responses and weights.

Pure functions used by :class:`~fisherflow.flow.OnlineGLM`; numpy arrays, pandas
objects and tensors are accepted, and results go back in the form of the input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fisherflow.flow._common import as_float_tensor
from fisherflow.flow.families import Family

__all__ = [
    "DTYPE",
    "ROW_OPTIONS",
    "Batches",
    "GLMBatch",
    "concat_batches",
    "design_matrix",
    "output",
    "output_kind",
    "read_batch",
    "unpack_batch",
]

#: The dtype every GLM statistic is kept in.
DTYPE = torch.float64


#: Per-row arrays a batch may carry besides ``X`` and ``y`` (keyword arguments of
#: :meth:`OnlineGLM.partial_fit`).
ROW_OPTIONS = ("sample_weight", "freq_weights", "var_weights", "offset", "exposure")


class Batches:
    """A re-iterable view of in-memory arrays as batches.

    For :meth:`OnlineGLM.refine` when the data fit in memory anyway; streams from
    disk should pass their own re-iterable (or a callable returning an iterator).
    Batches are ``(X, y, sample_weight)`` tuples, or — when any of ``freq_weights``,
    ``var_weights``, ``offset`` or ``exposure`` is given — dicts of
    :meth:`OnlineGLM.partial_fit` keyword arguments (``glm.partial_fit(**batch)``).

    Args:
        X: Design (array, frame or tensor).
        y: Response.
        sample_weight: Optional frequency weights (the scikit-learn name).
        batch_size: Rows per batch (>= 1).
        freq_weights: Optional frequency weights (statsmodels' name).
        var_weights: Optional variance weights.
        offset: Optional offset of the linear predictor.
        exposure: Optional exposure (log link only; ``log(exposure)`` joins the offset).

    Raises:
        ValueError: If ``batch_size`` is not a positive integer or lengths differ.
    """

    def __init__(
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        batch_size: int = 1024,
        *,
        freq_weights: Any = None,
        var_weights: Any = None,
        offset: Any = None,
        exposure: Any = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        rows = {
            "sample_weight": sample_weight,
            "freq_weights": freq_weights,
            "var_weights": var_weights,
            "offset": offset,
            "exposure": exposure,
        }
        for name, a in [("y", y), *rows.items()]:
            if a is not None and len(a) != len(X):
                raise ValueError(f"X and {name} must have the same length, got {len(X)}, {len(a)}")
        self.X, self.y, self.batch_size = X, y, batch_size
        self.w = sample_weight
        self.rows = {k: v for k, v in rows.items() if v is not None}

    def _rows(self, a: Any, i: int) -> Any:
        if a is None:
            return None
        sl = slice(i, i + self.batch_size)
        return a.iloc[sl] if hasattr(a, "iloc") else a[sl]

    def __iter__(self) -> Any:
        plain = set(self.rows) <= {"sample_weight"}
        for i in range(0, len(self.X), self.batch_size):
            if plain:
                yield self._rows(self.X, i), self._rows(self.y, i), self._rows(self.w, i)
            else:
                out = {"X": self._rows(self.X, i), "y": self._rows(self.y, i)}
                yield out | {k: self._rows(v, i) for k, v in self.rows.items()}

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.batch_size)


def unpack_batch(batch: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(X, y, row options)`` of a ``(X, y)``, ``(X, y, sample_weight)`` or dict batch.

    Raises:
        ValueError: If the batch has another form or a dict has unknown keys.
    """
    if isinstance(batch, Mapping):
        unknown = set(batch) - {"X", "y", *ROW_OPTIONS}
        if unknown or "X" not in batch or "y" not in batch:
            raise ValueError(
                f"a dict batch needs keys 'X' and 'y' and may have {list(ROW_OPTIONS)}, "
                f"got {sorted(batch)}"
            )
        return batch["X"], batch["y"], {k: batch[k] for k in ROW_OPTIONS if k in batch}
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            "each batch must be (X, y), (X, y, sample_weight) or a dict with keys 'X', 'y' "
            f"and {list(ROW_OPTIONS)}, got {type(batch).__name__}"
        )
    return batch[0], batch[1], {"sample_weight": batch[2]} if len(batch) == 3 else {}


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
        w: ``(n,)`` prior weights: frequency weights times variance weights (binomial
            trials count as variance weights).
        freq: ``(n,)`` frequency weights (observations counted).
        names: Column names of ``X``.
        var: ``(n,)`` variance weights (times binomial trials).
        offset: ``(n,)`` offset (with ``log(exposure)``) or ``None``.
    """

    X: Tensor
    y: Tensor
    w: Tensor
    freq: Tensor
    names: list[str]
    var: Tensor | None = None
    offset: Tensor | None = None

    @property
    def var_weights(self) -> Tensor:
        """The variance weights (ones when none were given)."""
        return self.var if self.var is not None else torch.ones_like(self.y)


def concat_batches(batches: Sequence[GLMBatch]) -> GLMBatch:
    """Rows of several batches as one batch (new tensors, even for a single batch)."""
    cat = torch.cat
    offs = [b.offset if b.offset is not None else torch.zeros_like(b.y) for b in batches]
    has_off = any(b.offset is not None for b in batches)
    return GLMBatch(
        cat([b.X for b in batches]),
        cat([b.y for b in batches]),
        cat([b.w for b in batches]),
        cat([b.freq for b in batches]),
        batches[0].names,
        cat([b.var_weights for b in batches]),
        cat(offs) if has_off else None,
    )


def _row_weights(values: Any, name: str, n: int, positive: bool = False) -> Tensor:
    t = as_float_tensor(values, name, DTYPE).reshape(-1)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per row of X), got {t.shape[0]}")
    if positive and bool((t <= 0).any()):
        raise ValueError(f"{name} must be > 0, got min {float(t.min()):g}")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0, got min {float(t.min()):g}")
    return t


def read_batch(
    family: Family,
    X: Any,
    y: Any,
    sample_weight: Any,
    fit_intercept: bool,
    feature_names: Sequence[str] | None,
    *,
    freq_weights: Any = None,
    var_weights: Any = None,
    offset: Any = None,
    exposure: Any = None,
) -> GLMBatch:
    """Validate one batch for ``family``.

    ``sample_weight`` and ``freq_weights`` are two names of the frequency weights
    (an observation counted ``f`` times); ``var_weights`` divide the variance
    (``Var y = φ V(μ)/v``), as statsmodels' GLM defines them.

    Raises:
        ValueError: On an empty batch, mismatched lengths, non-finite values, negative
            weights, both ``sample_weight`` and ``freq_weights``, ``exposure`` without
            a log link, or a response the family does not allow.
    """
    Xt, names = design_matrix(X, fit_intercept, feature_names)
    n = Xt.shape[0]
    if n == 0:
        raise ValueError("X has no rows")
    yt = as_float_tensor(y, "y", DTYPE)
    trials = None
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
    if sample_weight is not None and freq_weights is not None:
        raise ValueError("give frequency weights once: sample_weight or freq_weights, not both")
    fw = freq_weights if freq_weights is not None else sample_weight
    name = "freq_weights" if freq_weights is not None else "sample_weight"
    freq = torch.ones(n, dtype=DTYPE) if fw is None else _row_weights(fw, name, n)
    var = None if var_weights is None else _row_weights(var_weights, "var_weights", n)
    if trials is not None:
        var = trials if var is None else var * trials
    off = None if offset is None else as_float_tensor(offset, "offset", DTYPE).reshape(-1)
    if off is not None and off.shape[0] != n:
        raise ValueError(f"offset must have {n} entries (one per row of X), got {off.shape[0]}")
    if exposure is not None:
        if family.link.name != "log":
            raise ValueError(
                f"exposure needs the log link, got link {family.link.name!r}; pass an offset"
            )
        log_exp = torch.log(_row_weights(exposure, "exposure", n, positive=True))
        off = log_exp if off is None else off + log_exp
    w = freq if var is None else freq * var
    return GLMBatch(Xt, yt, w, freq, names, var, off)


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
