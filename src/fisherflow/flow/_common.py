"""Shared helpers for Fisher Flow: warnings, input checks, structure conversion, solves.

Everything here is private to :mod:`fisherflow.flow`; the warning categories are
re-exported publicly from :mod:`fisherflow.flow`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fisherflow.matrices import (
    Block,
    Dense,
    Diagonal,
    FisherMatrix,
    ParamLayout,
    Vector,
    eigh,
)

__all__ = [
    "STRUCTURES",
    "ConvergenceWarning",
    "RankDeficiencyWarning",
    "SeparationWarning",
    "as_float_tensor",
    "as_information",
    "check_flat",
    "check_real",
    "pinv_dense",
    "pinv_solve",
    "zeros_information",
]


class SeparationWarning(UserWarning):
    """Binary outcome data are (quasi-)perfectly separated: the MLE does not exist."""


class RankDeficiencyWarning(UserWarning):
    """The information matrix is singular: some parameter directions are not identified."""


class ConvergenceWarning(UserWarning):
    """An iterative fit stopped before meeting its tolerance."""


#: Relative eigenvalue cut-off below which a direction counts as unidentified; ``None``
#: means ``P * eps(dtype)`` (numpy's ``matrix_rank`` tolerance).
RCOND: float | None = None


def _rcond(rcond: float | None, size: int, dtype: torch.dtype) -> float:
    return rcond if rcond is not None else max(size, 1) * torch.finfo(dtype).eps


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


def _to_dense(info: FisherMatrix, layout: ParamLayout) -> FisherMatrix:
    return info if isinstance(info, Dense) else Dense.from_fisher(info)


def _to_diagonal(info: FisherMatrix, layout: ParamLayout) -> FisherMatrix:
    return (
        info
        if isinstance(info, Diagonal)
        else Diagonal(info.diagonal().clamp_min(0), layout, **info.meta)
    )


def _to_block(info: FisherMatrix, layout: ParamLayout) -> FisherMatrix:
    if isinstance(info, Block):
        return info
    blocks = {n: info.block(n).to_dense() for n in layout.names}
    return Block(blocks, {n: [n] for n in layout.names}, layout, **info.meta)


#: Structures Fisher Flow keeps its information in, and how any Fisher is converted
#: to them (diagonal keeps the diagonal; block keeps one dense block per parameter).
STRUCTURES: dict[str, Callable[[FisherMatrix, ParamLayout], FisherMatrix]] = {
    "dense": _to_dense,
    "diagonal": _to_diagonal,
    "block": _to_block,
}


def check_structure(structure: object) -> str:
    """Validate a structure name against :data:`STRUCTURES`."""
    if not isinstance(structure, str) or structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {sorted(STRUCTURES)}, got {structure!r}")
    return structure


def zeros_information(layout: ParamLayout, structure: str, dtype: torch.dtype) -> FisherMatrix:
    """Zero information (no observations) over ``layout`` in ``structure``."""
    zero = Diagonal(torch.zeros(layout.size, dtype=dtype), layout)
    return STRUCTURES[check_structure(structure)](zero, layout)


def as_information(
    info: object, layout: ParamLayout, structure: str, name: str, dtype: torch.dtype
) -> FisherMatrix:
    """Read ``info`` (a FisherMatrix, a ``(P, P)`` or ``(P,)`` tensor) in ``structure``.

    A raw tensor becomes a :class:`Dense` (2-D) or :class:`Diagonal` (1-D) with
    ``num_samples=0``; a FisherMatrix keeps its metadata.

    Raises:
        TypeError: If ``info`` is neither a FisherMatrix nor a tensor.
        ValueError: If its size or layout does not match, or it is not finite.
    """
    if isinstance(info, Tensor):
        mat = info.detach().to(dtype)
        if mat.dim() == 2:
            if tuple(mat.shape) != (layout.size, layout.size):
                raise ValueError(
                    f"{name} must be ({layout.size}, {layout.size}), got {tuple(mat.shape)}"
                )
            if not torch.isfinite(mat).all():
                raise ValueError(f"{name} contains NaN or Inf")
            fisher: FisherMatrix = Dense(0.5 * (mat + mat.T), layout)
        elif mat.dim() == 1:
            if mat.shape[0] != layout.size:
                raise ValueError(f"{name} must have {layout.size} entries, got {mat.shape[0]}")
            if not torch.isfinite(mat).all():
                raise ValueError(f"{name} contains NaN or Inf")
            fisher = Diagonal(mat, layout)
        else:
            raise ValueError(f"{name} must be a 1-D or 2-D tensor, got {mat.dim()}-D")
    elif isinstance(info, FisherMatrix):
        if info.size != layout.size:
            raise ValueError(f"{name} has size {info.size}, expected {layout.size}")
        fisher = info
        if info.layout != layout:
            if isinstance(info, Block):
                raise ValueError(f"{name} layout {info.layout.to_json()} != {layout.to_json()}")
            fisher = Dense(info.to_dense(), layout, **info.meta)
        if not torch.isfinite(fisher.diagonal()).all():
            raise ValueError(f"{name} contains NaN or Inf")
    else:
        raise TypeError(f"{name} must be a FisherMatrix or a tensor, got {type(info).__name__}")
    out = STRUCTURES[check_structure(structure)](fisher, layout)
    if out.dtype != dtype:
        out = out.to(dtype=dtype)
    if bool((out.diagonal() < -1e-9 * out.diagonal().abs().max().clamp_min(1)).any()):
        raise ValueError(f"{name} has a negative diagonal entry: information must be PSD")
    return out


def _spectral_pinv(vals: Tensor, damping: float, rcond: float | None) -> Tensor:
    rcond = _rcond(rcond, vals.numel(), vals.dtype)
    shifted = vals.clamp_min(0) + damping
    top = shifted.max() if shifted.numel() else shifted.new_tensor(0.0)
    keep = shifted > rcond * top.clamp_min(torch.finfo(vals.dtype).tiny)
    return torch.where(keep, 1.0 / torch.where(keep, shifted, 1.0), torch.zeros_like(shifted))


def _equilibrated_pinv_solve(
    mat: Tensor, cols: Tensor, damping: float, rcond: float | None
) -> tuple[Tensor, bool]:
    """``(A + λI)⁺ cols`` via the eigendecomposition of the Jacobi-scaled ``D⁻½ A D⁻½``.

    Scaling by the diagonal first (van der Sluis 1969) removes the ill-conditioning
    that comes from parameters on very different scales, which is most of it for
    regression designs; the rank cut-off is applied to the scaled spectrum.
    """
    a = mat + damping * torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
    d = a.diagonal().clamp_min(0)
    pos = d > 0
    s = torch.where(pos, d.rsqrt(), torch.zeros_like(d))
    scaled = s[:, None] * a * s[None, :]
    vals, vecs = eigh(scaled)
    inv = _spectral_pinv(vals, 0.0, rcond)
    inv = torch.where(vals.clamp_min(0) > 0, inv, torch.zeros_like(inv))
    singular = bool((inv == 0).any())
    out = s[:, None] * (vecs @ (inv[:, None] * (vecs.T @ (s[:, None] * cols))))
    return out, singular


def pinv_solve(
    info: FisherMatrix, v: Tensor, damping: float = 0.0, rcond: float | None = RCOND
) -> tuple[Tensor, bool]:
    """``(F + λI)⁺ v`` with a relative eigenvalue cut-off; also whether F + λI is singular.

    Dense, diagonal and block structures use their eigendecompositions (a
    Moore-Penrose pseudo-inverse on the retained spectrum); other structures fall
    back to ``F.solve`` (raising if singular).

    Args:
        info: The information.
        v: ``(P,)`` or ``(P, k)`` tensor.
        damping: λ >= 0.
        rcond: Eigenvalues below ``rcond * max eigenvalue`` count as zero.

    Returns:
        ``(x, singular)``.
    """
    cols = v.reshape(info.size, -1).to(info.dtype)
    if isinstance(info, Diagonal):
        inv = _spectral_pinv(info.values, damping, rcond)
        out = inv[:, None] * cols
        singular = bool((inv == 0).any())
    elif isinstance(info, (Dense, Block)):
        out = torch.empty_like(cols)
        singular = False
        groups = {"all": list(info.layout.names)} if isinstance(info, Dense) else info.groups()
        dense = info.matrix if isinstance(info, Dense) else None
        for g, names in groups.items():
            if dense is not None:
                idx, mat = None, dense
            else:
                assert isinstance(info, Block)
                idx, mat = info.layout.indices(names).to(cols.device), info.blocks[g]
            sol, sing = _equilibrated_pinv_solve(
                mat, cols if idx is None else cols[idx], damping, rcond
            )
            singular = singular or sing
            if idx is None:
                out = sol
            else:
                out[idx] = sol
    else:
        solved = info.solve(cols, damping=damping)
        assert isinstance(solved, Tensor)
        out, singular = solved, False
    return out.reshape(v.shape), singular


def pinv_dense(
    info: FisherMatrix, damping: float = 0.0, rcond: float | None = RCOND
) -> tuple[Tensor, bool]:
    """The dense ``(P, P)`` pseudo-inverse of ``F + λI`` and whether it was singular."""
    eye = torch.eye(info.size, dtype=info.dtype, device=info.device)
    out, singular = pinv_solve(info, eye, damping, rcond)
    return 0.5 * (out + out.T), singular


def matrix_rank(info: FisherMatrix, rcond: float | None = RCOND) -> int:
    """Numerical rank of ``info`` (of its Jacobi-scaled form for dense/block)."""
    rcond = _rcond(rcond, info.size, info.dtype)
    if isinstance(info, (Dense, Block)):
        mats = [info.matrix] if isinstance(info, Dense) else list(info.blocks.values())
        rank = 0
        for mat in mats:
            d = mat.diagonal().clamp_min(0)
            s = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
            vals = eigh(s[:, None] * mat * s[None, :])[0].clamp_min(0)
            top = float(vals.max()) if vals.numel() else 0.0
            rank += int((vals > rcond * top).sum()) if top > 0 else 0
        return rank
    vals = info.eigvalsh().clamp_min(0)
    if vals.numel() == 0 or float(vals[0]) <= 0:
        return 0
    return int((vals > rcond * vals[0]).sum())
