"""Information-weighted fusion: the one routine every Fisher Flow site calls.

Independent estimates ``(θᵢ, Iᵢ)`` combine as ``I = Σᵢ Iᵢ`` and
``θ = I⁺ Σᵢ Iᵢ θᵢ`` (the information-filter form of the Kalman update; exact for a
linear-Gaussian model). :func:`information_weighted` is that formula, given the two
sums; :func:`information_sums` forms them in the order given. :class:`FisherFlow`
updates, :func:`fuse`, :func:`robust_fuse` and :func:`fuse_across_ranks` all end in
:func:`information_weighted`.

**Structures.** ``Σᵢ Iᵢ`` is the structure's own ``+`` and ``Σᵢ Iᵢ θᵢ`` uses each
``Iᵢ`` exactly, so the result is always ``θ = (I₁ ⊕ I₂ ⊕ …)⁺ (I₁θ₁ + I₂θ₂ + …)`` with
``⊕`` the structure's addition:

* dense, diagonal, block: ``⊕`` is exact, and so is the fusion;
* EKFAC: exact when the estimates share the eigenbasis (``Q_A``, ``Q_G``; e.g.
  corrections of the same K-FAC basis); otherwise each later estimate is projected
  onto the first's basis (the EKFAC correction in a fixed basis);
* K-FAC: factor-wise (``A`` the ``num_samples``-weighted mean of the ``A``'s, ``G``
  the sum of the ``G``'s), exact when the input factors ``A`` are equal; otherwise
  the usual running-average K-FAC update, not ``Σ Gᵢ ⊗ Aᵢ``;
* low-rank: the factors concatenate (exact) and truncate back to the larger rank
  (the smallest components are dropped); the diagonals add exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from torch import Tensor

from fisherflow.matrices import FisherMatrix

__all__ = ["fuse_information", "information_sums", "information_weighted"]


def information_sums(
    thetas: Sequence[Tensor], infos: Sequence[FisherMatrix]
) -> tuple[FisherMatrix, Tensor]:
    """``(Σᵢ Iᵢ, Σᵢ Iᵢ θᵢ)``, summed in the order given (pure).

    Args:
        thetas: Flat ``(P,)`` estimates.
        infos: Their information, one structure and layout.

    Returns:
        The total information and the information-weighted sum of the estimates.
    """
    total, h = infos[0], cast(Tensor, infos[0].mv(thetas[0]))
    for theta, info in zip(thetas[1:], infos[1:], strict=True):
        total = total + info
        h = h + cast(Tensor, info.mv(theta))
    return total, h


def information_weighted(
    total: FisherMatrix, h: Tensor, anchor: Tensor | None = None, damping: float = 0.0
) -> Tensor:
    """``θ = anchor + (I + λ)⁺ (h − I · anchor)``: ``I⁺ h`` seen from ``anchor`` (pure).

    With ``anchor = 0`` (the default) this is ``(Σ Iᵢ)⁺ Σ Iᵢ θᵢ``. Measured from a
    current estimate, directions that ``I`` does not inform keep the anchor's value
    instead of becoming zero.

    Args:
        total: ``I = Σ Iᵢ``.
        h: ``Σ Iᵢ θᵢ``, flat ``(P,)``.
        anchor: The point the pseudo-inverse step starts from (default zero).
        damping: λ >= 0 added to ``I`` for the solve only.

    Returns:
        The fused flat estimate.

    Example:
        >>> import torch
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"t": (2,)})
        >>> I = Diagonal(torch.tensor([3.0, 0.0]), lay)
        >>> information_weighted(I, torch.tensor([6.0, 0.0]), anchor=torch.ones(2)).tolist()
        [2.0, 1.0]
    """
    if anchor is None:
        return cast(Tensor, total.pinv_solve(h, damping=damping))
    residual = h - cast(Tensor, total.mv(anchor))
    return anchor + cast(Tensor, total.pinv_solve(residual, damping=damping))


def fuse_information(
    thetas: Sequence[Tensor], infos: Sequence[FisherMatrix], anchor: Tensor | None = None
) -> tuple[Tensor, FisherMatrix]:
    """Information-weighted fusion of independent flat estimates (pure).

    Args:
        thetas: Flat ``(P,)`` estimates.
        infos: Their information, one structure and layout.
        anchor: As in :func:`information_weighted`.

    Returns:
        ``(θ, Σ Iᵢ)``.

    Example:
        >>> import torch
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"t": (1,)})
        >>> one = Diagonal(torch.ones(1, dtype=torch.float64), lay)
        >>> theta, total = fuse_information([torch.tensor([0.0], dtype=torch.float64),
        ...                                  torch.tensor([3.0], dtype=torch.float64)],
        ...                                 [one, 2 * one])
        >>> theta.tolist(), total.diagonal().tolist()
        ([2.0], [3.0])
    """
    total, h = information_sums(thetas, infos)
    return information_weighted(total, h, anchor), total
