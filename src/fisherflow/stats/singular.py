"""Rank and null directions of (possibly singular) Fisher matrices.

Non-identifiable or degenerate models have singular Fisher information, e.g.
N(θ₁³, 1) with an unused θ₂ has F = [[9θ₁⁴, 0], [0, 0]]: rank 1 for θ₁ ≠ 0
and rank 0 at θ₁ = 0 (Watanabe 2009, *Algebraic Geometry and Statistical
Learning Theory*, ch. 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fisher_rank", "null_directions"]


def _eigh(information: Tensor, rtol: float | None, atol: float) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(information, Tensor):
        raise TypeError(f"information must be a tensor, got {type(information).__name__}")
    if information.dim() < 2 or information.shape[-1] != information.shape[-2]:
        raise ValueError(
            f"information must have shape batch + (k, k), got {tuple(information.shape)}"
        )
    if (rtol is not None and rtol < 0) or atol < 0:
        raise ValueError(f"rtol and atol must be ≥ 0, got rtol={rtol}, atol={atol}")
    f = information if information.dtype == torch.float64 else information.double()
    f = 0.5 * (f + f.transpose(-1, -2))
    ev, vec = torch.linalg.eigh(f)
    k = f.shape[-1]
    r = k * torch.finfo(information.dtype).eps if rtol is None else rtol
    tol = torch.clamp_min(r * ev.abs().amax(-1, keepdim=True), atol)
    return ev, vec, tol


def fisher_rank(information: Tensor, *, rtol: float | None = None, atol: float = 0.0) -> Tensor:
    """Numerical rank: eigenvalues above max(rtol·λ_max, atol).

    Args:
        information: symmetric PSD matrix, shape ``batch + (k, k)``.
        rtol: relative tolerance; default ``k · eps`` of the input dtype.
        atol: absolute tolerance (eigenvalues ≤ atol count as zero).

    Returns:
        Integer tensor of shape ``batch``.

    Raises:
        TypeError: not a tensor.
        ValueError: not square or negative tolerances.

    Example:
        >>> import torch
        >>> fisher_rank(torch.tensor([[9.0, 0.0], [0.0, 0.0]]))  # N(θ₁³, 1) at θ₁ = 1
        tensor(1)
    """
    ev, _, tol = _eigh(information, rtol, atol)
    return (ev > tol).sum(-1)


def null_directions(information: Tensor, *, rtol: float | None = None, atol: float = 0.0) -> Tensor:
    """Orthonormal basis of the (numerical) null space of a Fisher matrix.

    Moving θ along these directions leaves the model unchanged to second
    order (KL ≈ ½ δᵀFδ = 0): they are the non-identifiable directions.

    Args:
        information: symmetric PSD matrix of shape (k, k) (unbatched: the
            null-space dimension may differ across a batch).
        rtol: relative tolerance; default ``k · eps`` of the input dtype.
        atol: absolute tolerance.

    Returns:
        Tensor of shape (k, k − rank), columns spanning the null space.

    Raises:
        TypeError: not a tensor.
        ValueError: not a single square matrix.

    Example:
        >>> import torch
        >>> null_directions(torch.tensor([[9.0, 0.0], [0.0, 0.0]]))
        tensor([[0.],
                [1.]])
    """
    if isinstance(information, Tensor) and information.dim() != 2:
        raise ValueError(
            f"null_directions takes one (k, k) matrix, got shape {tuple(information.shape)}"
        )
    ev, vec, tol = _eigh(information, rtol, atol)
    return vec[:, ev <= tol[..., 0]].to(information.dtype)
