"""Eigendecompositions of K-FAC factors spread round-robin over ranks, then broadcast.

With ``torch.distributed`` every rank holds the same all-reduced factors; instead of
each rank decomposing all of them, factor ``i`` (in a fixed order) is decomposed by
rank ``i mod world`` and broadcast from it, as distributed K-FAC implementations
(Osawa et al. 2019; Pauloski et al. 2020) spread inverse work. Every rank ends with
bitwise the same eigenbasis, so the ranks' parameters stay identical.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fisherflow.distributed import broadcast, is_distributed, world_size
from fisherflow.matrices import EKFAC, KFAC, FisherMatrix, eigh

__all__ = ["spread_eigenbasis"]


def _owner_eigh(factor: Tensor, owner: int, rank: int, group: Any) -> tuple[Tensor, Tensor]:
    if rank == owner:
        vals, vecs = eigh(factor)
    else:
        n = factor.shape[0]
        vals = factor.new_empty(n)
        vecs = factor.new_empty(n, n)
    src = owner if group is None else dist.get_global_rank(group, owner)
    return broadcast(vals, src, group), broadcast(vecs, src, group)


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
    QA: dict[str, Tensor | None] = {}
    QG: dict[str, Tensor | None] = {}
    S: dict[str, Tensor] = {}
    index = 0
    for g in fisher.kron_groups:
        pair: list[tuple[Tensor, Tensor | None]] = []
        for factor in (fisher.A[g], fisher.G[g]):
            if factor.dim() == 1:  # a diagonal factor: its own eigenvalues, identity basis
                pair.append((factor, None))
                continue
            pair.append(_owner_eigh(factor, index % world, rank, group))
            index += 1
        (ea, qa), (eg, qg) = pair
        QA[g], QG[g] = qa, qg
        S[g] = torch.outer(eg.clamp_min(0), ea.clamp_min(0))
    fisher._basis = EKFAC(fisher.kron_groups, QA, QG, S, fisher.layout, fisher.rest, **fisher.meta)
