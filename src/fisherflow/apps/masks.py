"""Which weights a pruning keeps: patterns, scopes and the row view of a weight.

Every pruned parameter is seen as a matrix of *rows* — one row per output unit, its
entries along the input dimension — whatever its storage: ``nn.Linear`` ``(n_out,
n_in)`` as is, ``nn.Conv*d`` ``(n_out, c_in, k...)`` flattened to ``(n_out, c_in·k...)``,
Hugging Face ``Conv1D`` (stored ``(n_in, n_out)``) transposed, a 1-D tensor as one row.
N:M groups are M consecutive entries of a row; the ``"row"`` scope compares within a
row (Wanda's and SparseGPT's comparison group).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "PATTERNS",
    "SCOPES",
    "check_nm",
    "check_scope",
    "check_sparsity",
    "from_rows",
    "parse_pattern",
    "resolve_sparsity",
    "select",
    "to_rows",
]

#: The pruning patterns: ``"unstructured"`` or ``"N:M"`` (N kept of every M).
PATTERNS = ("unstructured", "N:M")
#: Where ⌊sparsity × size⌋ is counted for unstructured pruning.
SCOPES = ("layer", "global", "row")

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def to_rows(t: Tensor, input_major: bool = False) -> Tensor:
    """The ``(n_out, n_in)`` row view of a parameter (a view when the storage allows).

    Example:
        >>> to_rows(torch.zeros(4, 3, 2, 2)).shape, to_rows(torch.zeros(5, 7), True).shape
        (torch.Size([4, 12]), torch.Size([7, 5]))
    """
    if t.dim() <= 1:
        return t.reshape(1, -1)
    if input_major:
        if t.dim() != 2:
            raise ValueError(f"an input-major weight must be 2-D, got shape {tuple(t.shape)}")
        return t.T
    return t.reshape(t.shape[0], -1)


def from_rows(rows: Tensor, shape: tuple[int, ...], input_major: bool = False) -> Tensor:
    """Inverse of :func:`to_rows`: a row-view tensor back in the parameter's shape."""
    if input_major and len(shape) == 2:
        return rows.T.reshape(shape)
    return rows.reshape(shape)


def check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    """A sparsity in ``[0, 1)`` as a float.

    Raises:
        TypeError: If it is not a real number.
        ValueError: If it is NaN or outside ``[0, 1)``.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return value


def parse_pattern(pattern: object) -> tuple[int, int] | None:
    """``None`` for ``"unstructured"``, ``(N, M)`` for ``"N:M"``.

    Raises:
        ValueError: If ``pattern`` is neither, or not ``1 <= N <= M``.

    Example:
        >>> parse_pattern("2:4"), parse_pattern("unstructured")
        ((2, 4), None)
    """
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n <= m:
        raise ValueError(f"pattern 'N:M' needs 1 <= N <= M, got {pattern!r}")
    return n, m


def resolve_sparsity(sparsity: object, nm: tuple[int, int] | None) -> float:
    """The sparsity a call prunes to: given, or ``1 - N/M`` for an N:M pattern.

    Raises:
        ValueError: If unstructured pruning has no sparsity, or a given sparsity
            disagrees with the N:M pattern's ``1 - N/M``.
    """
    if nm is None:
        if sparsity is None:
            raise ValueError("sparsity must be given for pattern='unstructured', got None")
        return check_sparsity(sparsity)
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
        raise ValueError(
            f"sparsity {sparsity!r} disagrees with pattern '{nm[0]}:{nm[1]}', which prunes "
            f"{implied:g}; pass sparsity=None or {implied:g}"
        )
    return implied


def _keep_lowest_pruned(scores: Tensor, k: int) -> Tensor:
    """A flat keep-mask pruning the ``k`` lowest scores (ties: lowest index first)."""
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.argsort(scores.reshape(-1), stable=True)
        mask[order[:k]] = False
    return mask


def select(
    scores: Mapping[str, Tensor],
    sparsity: float,
    nm: tuple[int, int] | None = None,
    scope: str = "layer",
) -> dict[str, Tensor]:
    """Keep-masks (``True`` = kept) pruning the lowest scores.

    Unstructured: ``⌊sparsity × size⌋`` entries per scope — each tensor (``"layer"``),
    all tensors together (``"global"``) or each row (``"row"``). N:M: in every group
    of M consecutive entries of a row, the ``M − N`` lowest are pruned (``scope`` must
    be ``"layer"``: the group is the scope).

    Args:
        scores: ``{name: (n_out, n_in) row-view saliencies}``; lower is pruned first.
        sparsity: Fraction in ``[0, 1)`` (ignored for N:M, see
            :func:`resolve_sparsity`).
        nm: ``(N, M)`` or ``None`` for unstructured.
        scope: ``"layer"``, ``"global"`` or ``"row"``.

    Returns:
        ``{name: bool row-view mask}``.

    Raises:
        ValueError: For an unknown scope, a scope other than ``"layer"`` with N:M, or
            a row length that M does not divide.

    Example:
        >>> select({"w": torch.tensor([[4.0, 1.0, 3.0, 2.0]])}, 0.5, (2, 4))["w"].tolist()
        [[True, False, True, False]]
    """
    check_scope(scope, nm)
    if nm is not None:
        return {name: _select_nm(name, s, nm) for name, s in scores.items()}
    if scope == "layer":
        return {
            name: _keep_lowest_pruned(s, math.floor(sparsity * s.numel())).reshape(s.shape)
            for name, s in scores.items()
        }
    if scope == "row":
        out = {}
        for name, s in scores.items():
            k = math.floor(sparsity * s.shape[1])
            order = torch.argsort(s, dim=1, stable=True)
            mask = torch.ones_like(s, dtype=torch.bool)
            mask.scatter_(1, order[:, :k], False)
            out[name] = mask
        return out
    flat = torch.cat([s.reshape(-1).to(torch.float64).cpu() for s in scores.values()])
    mask = _keep_lowest_pruned(flat, math.floor(sparsity * flat.numel()))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = mask[start : start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return out


def check_scope(scope: object, nm: tuple[int, int] | None) -> None:
    """Check a scope name, and that N:M patterns use ``"layer"``.

    Raises:
        ValueError: For an unknown scope, or another scope with N:M.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if nm is not None and scope != "layer":
        raise ValueError(f"scope must be 'layer' with an N:M pattern, got {scope!r}")


def check_nm(name: str, cols: int, nm: tuple[int, int]) -> None:
    """Check that M divides a row of ``cols`` entries of parameter ``name``.

    Raises:
        ValueError: If it does not.
    """
    n, m = nm
    if cols % m:
        raise ValueError(
            f"pattern '{n}:{m}' needs the input dimension of {name!r} to be a multiple of "
            f"{m}, got {cols}"
        )


def _select_nm(name: str, s: Tensor, nm: tuple[int, int]) -> Tensor:
    n, m = nm
    rows, cols = s.shape
    check_nm(name, cols, nm)
    groups = s.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, : m - n], False)
    return mask.reshape(rows, cols)
