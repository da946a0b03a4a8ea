"""K-FAC eigenbases for the optimizers: spread over ranks, or refreshed by power iteration.

With ``torch.distributed`` every rank holds the same all-reduced factors; instead of
each rank decomposing all of them, factor ``i`` (in a fixed order) is decomposed by
rank ``i mod world`` and broadcast from it, as distributed K-FAC implementations
(Osawa et al. 2019; Pauloski et al. 2020) spread inverse work. Every rank ends with
bitwise the same eigenbasis, so the ranks' parameters stay identical.

:func:`refresh_pairs` is the cheaper alternative (``eigen_refresh="power"``): after a
first eigendecomposition, each factor's basis is moved by one power iteration and a QR
decomposition from the previous one (Vyas et al. 2024), the eigenvalues being the
Rayleigh quotients in it; every rank computes it from the same inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fisherflow.distributed import broadcast, is_distributed, world_size
from fisherflow.matrices import EKFAC, KFAC, FisherMatrix, eigh
from fisherflow.optim.eigenbasis import eigenpairs

__all__ = ["Pair", "install_eigenbasis", "refresh_pairs", "spread_eigenbasis"]

#: One factor's ``(eigenvalues, eigenvectors)``; ``None`` vectors: a diagonal factor.
Pair = tuple[Tensor, Tensor | None]


def _owner_eigh(factor: Tensor, owner: int, rank: int, group: Any) -> tuple[Tensor, Tensor]:
    if rank == owner:
        vals, vecs = eigh(factor)
    else:
        n = factor.shape[0]
        vals = factor.new_empty(n)
        vecs = factor.new_empty(n, n)
    src = owner if group is None else dist.get_global_rank(group, owner)
    return broadcast(vals, src, group), broadcast(vecs, src, group)


def install_eigenbasis(fisher: KFAC, pairs: dict[str, tuple[Pair, Pair]]) -> None:
    """Give a K-FAC Fisher its eigenbasis from per-group ``(A pair, G pair)``.

    Its solves, powers and eigenvalues then use these instead of decomposing the
    factors (the eigenvalues of ``G ⊗ A`` are the outer product of the factors').
    """
    QA: dict[str, Tensor | None] = {}
    QG: dict[str, Tensor | None] = {}
    S: dict[str, Tensor] = {}
    for g in fisher.kron_groups:
        (ea, qa), (eg, qg) = pairs[g]
        QA[g], QG[g] = qa, qg
        S[g] = torch.outer(eg.clamp_min(0), ea.clamp_min(0))
    fisher._basis = EKFAC(fisher.kron_groups, QA, QG, S, fisher.layout, fisher.rest, **fisher.meta)


def spread_eigenbasis(fisher: FisherMatrix, group: Any = None) -> None:
    """Install a K-FAC Fisher's eigenbasis, its factors decomposed round-robin over ranks.

    Does nothing without a process group or for another structure (their
    decompositions happen where the estimator computes them).

    Args:
        fisher: The preconditioner (identical on every rank).
        group: The process group (default: the world).
    """
    if not isinstance(fisher, KFAC) or not is_distributed():
        return
    rank, world = dist.get_rank(group), world_size(group)
    pairs: dict[str, tuple[Pair, Pair]] = {}
    index = 0
    for g in fisher.kron_groups:
        pair: list[Pair] = []
        for factor in (fisher.A[g], fisher.G[g]):
            if factor.dim() == 1:  # a diagonal factor: its own eigenvalues, identity basis
                pair.append((factor, None))
                continue
            pair.append(_owner_eigh(factor, index % world, rank, group))
            index += 1
        pairs[g] = (pair[0], pair[1])
    install_eigenbasis(fisher, pairs)


def refresh_pairs(
    fisher: KFAC, previous: dict[str, tuple[Pair, Pair]] | None
) -> dict[str, tuple[Pair, Pair]]:
    """Each factor's eigenpairs, by power iteration + QR from ``previous`` (eigh at first).

    Args:
        fisher: The K-FAC curvature.
        previous: The pairs of the last refresh over the same groups, or ``None``.

    Returns:
        ``{group: ((A eigenvalues, A basis), (G eigenvalues, G basis))}``; a diagonal
        factor is its own eigenvalues with a ``None`` basis.
    """
    out: dict[str, tuple[Pair, Pair]] = {}
    for g in fisher.kron_groups:
        pair: list[Pair] = []
        for i, factor in enumerate((fisher.A[g], fisher.G[g])):
            if factor.dim() == 1:
                pair.append((factor, None))
                continue
            before = None if previous is None else previous[g][i][1]
            pair.append(eigenpairs(factor, before, "power"))
        out[g] = (pair[0], pair[1])
    return out
