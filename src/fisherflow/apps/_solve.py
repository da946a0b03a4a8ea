"""Solving with a weighted sum of Fisher matrices: ``(Σ wᵢFᵢ + λI) x = b``.

Dense, diagonal and block matrices add exactly (their ``+``), so the sum is formed
and solved in its structure. K-FAC, EKFAC and low-rank do not: ``G₁⊗A₁ + G₂⊗A₂`` is
not a Kronecker product and a sum of low-rank factors outgrows its rank. For them
the *exact* sum is applied matrix-free (each ``Fᵢ.mv`` in its own structure, per
layer: never a P×P matrix) inside preconditioned conjugate gradients, with the
structure's own approximate ``+`` (K-FAC's factor-wise sum, which is exact when the
input factors agree) as the preconditioner — so CG converges in one step when the
approximation is exact and in a few otherwise. Written by hand because scipy's
``cg`` works on float64 numpy arrays on the CPU only and the matrices here may live
on a GPU.

Reference: Hestenes & Stiefel (1952); Saad (2003), *Iterative Methods for Sparse
Linear Systems*, alg. 9.1 (preconditioned CG).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from fisherflow.estimation.data import warn_user
from fisherflow.matrices import FisherMatrix

__all__ = ["EXACT_SUM", "ConvergenceNotice", "weighted_solve"]

#: Structures whose ``+`` is exact, so a weighted sum is solved in its structure.
EXACT_SUM = frozenset({"dense", "diagonal", "block"})


class ConvergenceNotice(UserWarning):
    """Conjugate gradients stopped at ``max_iter`` before reaching its tolerance."""


def weighted_sum(fishers: Sequence[FisherMatrix], weights: Sequence[float]) -> FisherMatrix:
    """``Σ wᵢ Fᵢ`` with the structure's own ``+`` (exact only for :data:`EXACT_SUM`)."""
    total = weights[0] * fishers[0]
    for w, F in zip(weights[1:], fishers[1:], strict=True):
        total = total + w * F
    return total


def weighted_solve(
    fishers: Sequence[FisherMatrix],
    weights: Sequence[float],
    rhs: Tensor,
    damping: float = 0.0,
    *,
    tol: float = 1e-8,
    max_iter: int = 1000,
) -> Tensor:
    """``(Σ wᵢFᵢ + λI)⁺ b`` for a flat ``(P,)`` right-hand side in the Fishers' layout.

    Args:
        fishers: Matrices over one layout and structure.
        weights: One weight ``>= 0`` per matrix.
        rhs: ``b``, flat ``(P,)``, in the range of the sum (as ``Σ wᵢFᵢ vᵢ`` is).
        damping: λ >= 0.
        tol: Relative residual at which conjugate gradients stops.
        max_iter: Most conjugate-gradient steps (a :class:`ConvergenceNotice` if hit).

    Returns:
        The flat solution in ``rhs``'s dtype. Conjugate gradients runs in float64
        whatever the inputs' dtype (float32 stalls far above the tolerance).

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"w": (2,)})
        >>> Fs = [Diagonal(torch.tensor([1.0, 2.0]), lay), Diagonal(torch.tensor([3.0, 2.0]), lay)]
        >>> weighted_solve(Fs, [1.0, 1.0], torch.tensor([8.0, 8.0])).tolist()
        [2.0, 2.0]
    """
    if fishers[0].structure in EXACT_SUM:
        exact = weighted_sum(fishers, weights)
        return cast(Tensor, exact.pinv_solve(rhs, damping=damping)).to(rhs.dtype)
    fishers = [F.to(dtype=torch.float64) if F.dtype != torch.float64 else F for F in fishers]
    approx = weighted_sum(fishers, weights)

    def apply(v: Tensor) -> Tensor:
        out = damping * v
        for w, F in zip(weights, fishers, strict=True):
            out = out + w * cast(Tensor, F.mv(v))
        return out

    def precondition(r: Tensor) -> Tensor:
        return cast(Tensor, approx.pinv_solve(r, damping=damping))

    b = rhs.to(torch.float64)
    x = torch.zeros_like(b)
    r = b.clone()
    norm_b = float(b.norm())
    if norm_b == 0.0:
        return x.to(rhs.dtype)
    z = precondition(r)
    p = z.clone()
    rz = torch.dot(r, z)
    for _ in range(max_iter):
        q = apply(p)
        pq = torch.dot(p, q)
        if float(pq) <= 0.0:  # no curvature left along p: converged in the range
            break
        alpha = rz / pq
        x = x + alpha * p
        r = r - alpha * q
        if float(r.norm()) <= tol * norm_b:
            break
        z = precondition(r)
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    else:
        warn_user(
            f"conjugate gradients stopped after {max_iter} steps at relative residual "
            f"{float(r.norm()) / norm_b:.2e} (tolerance {tol:g}); add damping",
            ConvergenceNotice,
        )
    return x.to(rhs.dtype)
