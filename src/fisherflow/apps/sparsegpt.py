"""Column-by-column OBS compensation with one Cholesky per layer (SparseGPT-style).

Frantar & Alistarh (2023), "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", Algorithm 1. Every output row of a layer shares one input
Hessian ``B`` (for a K-FAC row ``G_rr B``, the scale cancelling). With ``U`` the upper
Cholesky factor of ``B⁻¹`` (``B⁻¹ = UᵀU``), the columns are visited in order; when
column ``j`` of a row is pruned, its error ``e = θ_j / U_jj`` is spread over the
*later* columns, ``θ_{j:} −= e U_{j, j:}`` — the OBS update of weight ``j`` in the
problem where columns ``< j`` are frozen (row ``j`` of ``U`` holds the inverse of ``B``
restricted to columns ``j…`` up to scale). Updates are applied lazily in blocks of
columns, so the cost is one Cholesky of ``B⁻¹`` plus ``O(n_out · n_in²)`` per layer,
against ``Σ_r |Q_r|³/3`` for the joint row solves of :mod:`fisherflow.apps.obs`.

It is **approximate**: a kept weight left of a pruned one never moves for it, so the
result is feasible on the same support but its quadratic loss is at least the joint
minimiser's; it equals the joint minimiser when every row's pruned weights precede
its kept ones. The mask is chosen beforehand (by OBS saliency in
:func:`fisherflow.apps.prune`), not re-selected per block as SparseGPT does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sequential_compensation"]


def sequential_compensation(
    rows: Tensor, keep: Tensor, b_inverse: Tensor, block: int = 128
) -> Tensor:
    """Prune ``rows`` to ``keep`` with SparseGPT's sequential OBS updates.

    Args:
        rows: ``(n_out, n)`` weights, one output row per row (float64 advised).
        keep: ``(n_out, n)`` bool mask, ``True`` = kept.
        b_inverse: ``(n, n)`` inverse of the (damped) input Hessian every row shares.
        block: Columns whose updates are applied together (lazy batch updates).

    Returns:
        The compensated ``(n_out, n)`` weights, pruned entries exactly zero.

    Raises:
        ValueError: If ``b_inverse`` is not positive definite, or shapes disagree.

    Example:
        >>> B_inv = torch.tensor([[2.0, 1.0], [1.0, 2.0]]).inverse()
        >>> rows = torch.tensor([[1.0, 1.0]])
        >>> # prune column 0; column 1 absorbs it: θ₁ − B₁₁⁻¹B₁₀(0 − θ₀) = 1 + ½ = 1.5
        >>> sequential_compensation(rows, torch.tensor([[False, True]]), B_inv).tolist()
        [[0.0, 1.5]]
    """
    n = rows.shape[1]
    if keep.shape != rows.shape or b_inverse.shape != (n, n):
        raise ValueError(
            f"rows {tuple(rows.shape)}, keep {tuple(keep.shape)} and b_inverse "
            f"{tuple(b_inverse.shape)} must be (n_out, n), (n_out, n) and (n, n)"
        )
    # upper Cholesky factor of B⁻¹: torch returns the lower L with B⁻¹ = L Lᵀ, U = Lᵀ
    chol, info = torch.linalg.cholesky_ex(b_inverse.to(rows.dtype), upper=True)
    if int(info) != 0:
        raise ValueError("b_inverse must be positive definite; pass damping > 0")
    w = rows.clone()
    pruned = ~keep
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        u1 = chol[i1:i2, i1:i2]
        for j in range(i2 - i1):
            e = torch.where(pruned[:, i1 + j], w1[:, j] / u1[j, j], 0.0)
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ chol[i1:i2, i2:]
    return w * keep
