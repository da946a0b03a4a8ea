"""Accumulators of whole outer products: dense, block and low-rank sketches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fisherflow.distributed import all_gather_columns
from fisherflow.estimation.accumulate import Accumulator, Pairs, Plan, per_row_dict
from fisherflow.estimation.layers import gram_into, symmetrize
from fisherflow.matrices import Block, Dense, FisherMatrix, LowRank, orthonormal_factor

__all__ = ["GroupAcc", "LowRankAcc"]


def _row_matrix(plan: Plan, rowd: Mapping[str, Tensor], names: Sequence[str], rows: int) -> Tensor:
    """``(rows, Σ sizes)``: the per-row gradients of ``names`` side by side (zeros if unseen)."""
    parts = [
        rowd[n].reshape(rows, -1) if n in rowd else plan.zeros(rows, plan.layout.subset([n]).size)
        for n in names
    ]
    return torch.cat(parts, 1)


class GroupAcc(Accumulator):
    """Dense blocks ``Σ_n g_n g_nᵀ`` per group (one group = the whole layout for dense).

    Args:
        plan: What the estimate covers.
        dense: One block over the whole layout (``"dense"``) instead of one per
            module (``"block"``).
    """

    rows_exact = True  # positions fed as rows stay exact (outer products of rows)
    per_layer = False  # blocks span layers

    def __init__(self, plan: Plan, dense: bool = False) -> None:
        super().__init__(plan)
        self.dense = dense
        self.groups = {"all": list(plan.layout.names)} if dense else plan.groups
        for g, names in self.groups.items():
            size = plan.layout.subset(names).size
            self.state[g] = plan.zeros(size, size)  # a gram_into accumulator

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:  # noqa: D102
        rowd = per_row_dict(self.plan, pairs, func)
        for g, names in self.groups.items():
            self.state[g] = gram_into(self.state[g], _row_matrix(self.plan, rowd, names, rows))

    def build(self, **meta: Any) -> FisherMatrix:  # noqa: D102
        # handed over when final (Accumulator.final), else copied
        blocks = {g: symmetrize(m if self.final else m.clone()) for g, m in self.state.items()}
        if self.dense:
            return Dense(blocks["all"], self.plan.layout, **meta)
        return Block(blocks, self.groups, self.plan.layout, **meta)


class LowRankAcc(Accumulator):
    """A streaming sketch ``B Bᵀ`` of ``Σ_n g_n g_nᵀ``, truncated to ``rank`` at the end.

    Per-row gradients are appended as columns of ``B``; when ``B`` grows past
    ``4·keep`` columns it is compressed to its top ``keep = max(2·rank, rank + 16)``
    eigen-directions (exact while the total number of scores is at most ``keep``).

    Args:
        plan: What the estimate covers.
        rank: Rank of the result.
    """

    def __init__(self, plan: Plan, rank: int = 10) -> None:
        super().__init__(plan)
        self.rank = rank
        self.keep = min(plan.layout.size, max(2 * rank, rank + 16))
        self.cols: list[Tensor] = []
        self.width = 0

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:  # noqa: D102
        rowd = per_row_dict(self.plan, pairs, func)
        self.cols.append(_row_matrix(self.plan, rowd, self.plan.layout.names, rows).T)
        self.width += rows
        if self.width > 4 * self.keep:
            self._compress(self.keep)

    def _compress(self, rank: int) -> None:
        B = torch.cat(self.cols, 1)
        U, s = orthonormal_factor(B, rank)
        self.cols = [U * s.sqrt()]
        self.width = self.cols[0].shape[1]

    def factor(self) -> Tensor:
        """The current ``(P, k)`` factor ``B``."""
        if not self.cols:
            return self.plan.zeros(self.plan.layout.size, 1)
        return torch.cat(self.cols, 1)

    def reduce(self, group: Any = None) -> None:
        """Every rank's sketch columns side by side: ``Σ_ranks B Bᵀ`` (truncated at build)."""
        B = all_gather_columns(self.factor(), group)
        self.cols, self.width = [B], B.shape[1]

    def build(self, **meta: Any) -> FisherMatrix:  # noqa: D102
        U, s = orthonormal_factor(self.factor(), min(self.rank, self.plan.layout.size))
        return LowRank(U, s, self.plan.layout, **meta)
