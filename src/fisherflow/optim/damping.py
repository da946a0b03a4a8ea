"""Factored (π) damping of a K-FAC curvature (Martens & Grosse 2015, §6.3).

Exact damping solves ``(G ⊗ A + λI)⁻¹ g`` (in the factors' eigenbasis). Factored
damping instead adds ``√λ`` to each factor, balanced by π::

    (G + (√λ/π) I) ⊗ (A + π√λ I),   π = √( (tr A / dim A) / (tr G / dim G) )

which is ``G ⊗ A + √λ (π G ⊗ I + A ⊗ I / π) + λ I``: the exact damping plus a
cross term that damps each factor in proportion to the other's average eigenvalue.
It is what K-FAC implementations that invert the factors separately use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fisherflow.matrices import KFAC

__all__ = ["factored_damping", "pi_factor"]


def _mean_eigenvalue(factor: Tensor) -> float:
    return float(factor.sum() if factor.dim() == 1 else factor.diagonal().sum()) / factor.shape[0]


def _add_identity(factor: Tensor, c: float) -> Tensor:
    if factor.dim() == 1:
        return factor + c
    return factor + c * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)


def pi_factor(A: Tensor, G: Tensor) -> float:
    """π = √((tr A / dim A) / (tr G / dim G)); 1 when either trace is zero.

    Example:
        >>> pi_factor(4 * torch.eye(3), torch.eye(2))
        2.0
    """
    a, g = _mean_eigenvalue(A), _mean_eigenvalue(G)
    return math.sqrt(a / g) if a > 0 and g > 0 else 1.0


def factored_damping(fisher: KFAC, damping: float) -> KFAC:
    """The K-FAC Fisher with π-damped factors (module docstring); ``rest`` gets ``+λ``.

    Solve with ``damping=0`` afterwards: the damping is inside the factors.

    Args:
        fisher: A K-FAC Fisher.
        damping: λ >= 0.

    Returns:
        A :class:`~fisherflow.matrices.KFAC` with factors ``A + π√λ I``, ``G + √λ/π I``.

    Example:
        >>> from fisherflow.matrices import KronGroup, ParamLayout
        >>> layout = ParamLayout.from_shapes({"w": (1, 1)})
        >>> F = KFAC({"l": KronGroup("w")}, {"l": torch.eye(1)}, {"l": 4 * torch.eye(1)}, layout)
        >>> factored_damping(F, 1.0).to_dense().item()  # (4 + 1/0.5)(1 + 0.5)
        9.0
    """
    root = math.sqrt(damping)
    A, G = {}, {}
    for g in fisher.kron_groups:
        pi = pi_factor(fisher.A[g], fisher.G[g])
        A[g] = _add_identity(fisher.A[g], pi * root)
        G[g] = _add_identity(fisher.G[g], root / pi)
    return KFAC(fisher.kron_groups, A, G, fisher.layout, fisher.rest + damping, **fisher.meta)
