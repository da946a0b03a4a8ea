"""Many small SPD solves, one per output row, on a sub-matrix of one shared matrix.

Joint OBS per K-FAC row (:mod:`fisherflow.apps.obs`) solves, for every row ``r`` of a
layer, ``S[I_r, I_r] z_r = b_r`` where ``S`` is one ``(n, n)`` matrix (the input factor
``B`` or its inverse) and ``I_r`` the row's pruned or kept columns. Rows are solved in
batches: the sub-matrices are gathered, factorised with one batched Cholesky and
solved with two batched triangular solves (``torch.cholesky_solve`` is several times
slower than ``torch.linalg.solve_triangular`` on CPU for a single right-hand side).
Under N:M patterns and per-row scope every row has the same ``|I_r|``, so no padding
is needed; otherwise rows are padded to the widest with identity rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["row_solves"]

#: Entries of the gathered row systems held at once (rows × width²), bounding memory.
ROW_BATCH = 2**22


def row_solves(matrix: Tensor, index: Tensor, counts: Tensor, rhs: Tensor) -> Tensor | None:
    """Solve ``matrix[I_r, I_r] z_r = rhs_r`` for every row ``r``.

    Args:
        matrix: ``(n, n)`` symmetric positive definite matrix shared by the rows.
        index: ``(rows, width)`` column indices; row ``r`` uses its first ``counts[r]``.
        counts: ``(rows,)`` number of valid indices per row (``<= width``).
        rhs: ``(rows, width)`` right-hand sides (entries past ``counts[r]`` ignored).

    Returns:
        ``(rows, width)`` solutions, zero past ``counts[r]``; ``None`` if some row's
        sub-matrix is not positive definite (the caller names the layer).

    Example:
        >>> S = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
        >>> idx = torch.tensor([[0, 1], [2, 0]])
        >>> b = torch.tensor([[3.0, 3.0], [8.0, 5.0]])  # row 1 uses index 2 only
        >>> row_solves(S, idx, torch.tensor([2, 1]), b).round(decimals=6).tolist()
        [[1.0, 1.0], [2.0, 0.0]]
    """
    rows, width = index.shape
    out = torch.zeros(rows, width, dtype=matrix.dtype, device=matrix.device)
    if rows == 0 or width == 0:
        return out
    ragged = bool((counts != width).any())
    valid = torch.arange(width, device=index.device)[None, :] < counts[:, None]
    eye = torch.eye(width, dtype=matrix.dtype, device=matrix.device)
    step = max(1, ROW_BATCH // (width * width))
    for start in range(0, rows, step):
        part = slice(start, min(start + step, rows))
        idx = index[part]
        system = matrix[idx[:, :, None], idx[:, None, :]]
        b = rhs[part]
        if ragged:  # padded entries: identity rows and columns, zero right-hand side
            ok = valid[part]
            system = torch.where(ok[:, :, None] & ok[:, None, :], system, eye)
            b = torch.where(ok, b, 0.0)
        chol, info = torch.linalg.cholesky_ex(system)
        if bool((info != 0).any()):
            return None
        y = torch.linalg.solve_triangular(chol, b[:, :, None], upper=False)
        out[part] = torch.linalg.solve_triangular(chol.mT, y, upper=True)[:, :, 0]
    return out
