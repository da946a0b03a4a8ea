"""The K-FAC accumulator: Kronecker factors per layer, an exact diagonal for the rest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fisherflow.distributed import all_reduce_sum
from fisherflow.estimation.accumulate import Accumulator, Pairs, Plan
from fisherflow.estimation.accumulators.diagonal import DiagonalAcc
from fisherflow.estimation.layers import Record, symmetrize
from fisherflow.matrices import KFAC

__all__ = ["KFACAcc"]


class KFACAcc(Accumulator):
    """K-FAC factors (expand or reduce convention) and the rest's exact diagonal.

    Args:
        plan: What the estimate covers (its ``reduce`` flag is the convention).
        keep_rows: Keep the vectors of small factors for fast eigenbases (EKFAC).
    """

    rows_exact = True  # positions fed as rows stay exact (outer products of rows)
    per_layer = True  # each parameter from its own records

    def __init__(self, plan: Plan, keep_rows: bool = False) -> None:
        super().__init__(plan)
        self.rest = DiagonalAcc(plan, plan.rest)
        self.counts: dict[str, float] = {}
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, Tensor] = {}
        #: ``{("A" | "G", group): rows}`` the vectors whose Gram matrix is a factor, kept
        #: (with ``keep_rows``) while there are fewer than a third of the factor's side:
        #: then :func:`~fisherflow.matrices.linalg.gram_eigh` eigendecomposes the factor
        #: from them far faster than ``eigh`` (EKFAC). ``None`` once dropped.
        self.rows: dict[tuple[str, str], list[Tensor] | None] = {}
        self.keep_rows = keep_rows

    def _group(self, rec: Record) -> str | None:
        return self.plan.group_of_weight.get(self.plan.name_of[id(rec.weight)])

    def _keep(self, key: tuple[str, str], rows: Tensor | None, side: int) -> None:
        if not self.keep_rows:
            return
        held = self.rows.setdefault(key, [])
        if held is None:
            return
        if rows is None or 3 * (sum(r.shape[0] for r in held) + rows.shape[0]) >= side:
            self.rows[key] = None
            return
        held.append(rows.clone())  # not a view that keeps a whole activation alive

    def begin(self, records: Sequence[Record]) -> None:  # noqa: D102
        for rec in records:
            g = self._group(rec)
            if g is None:
                continue
            self.A[g], m = rec.handler.factor_a(rec, self.plan.reduce, self.A.get(g))
            self.counts[g] = self.counts.get(g, 0) + m
            if self.keep_rows:
                side = self.A[g].shape[0]
                self._keep(("A", g), rec.handler.rows_a(rec, self.plan.reduce), side)

    def end_batch(self) -> None:  # noqa: D102
        self.rest.end_batch()

    def _split(
        self, pairs: Pairs
    ) -> tuple[list[tuple[str, Record, Tensor]], list[tuple[Record, Tensor]]]:
        """Records of Kronecker groups (with their group) and the rest (diagonal)."""
        grouped: list[tuple[str, Record, Tensor]] = []
        rest: list[tuple[Record, Tensor]] = []
        for rec, d in pairs:
            g = self._group(rec)
            if g is None:
                rest.append((rec, d))
            else:
                grouped.append((g, rec, d))
        return grouped, rest

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:  # noqa: D102
        grouped, rest = self._split(pairs)
        for g, rec, d in grouped:
            self._add_g(g, rec, d)
        self.rest.add(rest, func, rows)

    def add_many(self, pairs: Pairs, k: int, rows: int) -> None:
        """``G`` of ``k`` scores from one ``(k·rows·S, n_out)`` product per layer."""
        grouped, rest = self._split(pairs)
        for g, rec, d in grouped:
            if not rec.handler.stacked_g:
                for i in range(k):
                    self._add_g(g, rec, d[i * rows : (i + 1) * rows])
                continue
            self._add_g(g, rec, d)
        if rest:
            self.rest.add_many(rest, k, rows)

    def _add_g(self, g: str, rec: Record, d: Tensor) -> None:
        if rec.rows is None:
            self.G[g] = rec.handler.factor_g(rec, d, self.plan.reduce, self.G.get(g))
            if self.keep_rows:
                side = self.G[g].shape[0]
                self._keep(("G", g), rec.handler.rows_g(rec, d, self.plan.reduce), side)
            return
        self._keep(("G", g), None, 0)  # a use covering some output rows only
        n_out = self.plan.kron[g].dims(self.plan.layout)[0]
        if g not in self.G:
            self.G[g] = self.plan.zeros(n_out, n_out)
        block = self.G[g][rec.rows, rec.rows]
        block += symmetrize(rec.handler.factor_g(rec, d, self.plan.reduce), factor=True)
        self.G[g][rec.rows, rec.rows] = block

    def kept_rows(self, side: str, group: str) -> Tensor | None:
        """All kept rows of a factor (``side`` ``"A"`` or ``"G"``), or ``None``."""
        held = self.rows.get((side, group))
        return torch.cat(held) if held else None

    def factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(A, G)`` with ``A`` the mean over input vectors and ``G`` the sum.

        New tensors, the accumulated sums left as they are; with :attr:`final`, the
        sums themselves, normalised and mirrored in place (the same values).
        """
        A, G = {}, {}
        for g, spec in self.plan.kron.items():
            n_out, n_cols = spec.dims(self.plan.layout)
            count = max(self.counts.get(g, 0), 1)
            if g not in self.A:
                A[g] = self.plan.zeros(n_cols, n_cols)
            elif self.final:
                A[g] = symmetrize(self.A[g].div_(count), factor=True)
            else:  # the division makes the new tensor (mirroring copies entries)
                A[g] = symmetrize(self.A[g] / count, factor=True)
            if g not in self.G:
                G[g] = self.plan.zeros(n_out, n_out)
            else:
                G[g] = symmetrize(self.G[g] if self.final else self.G[g].clone(), factor=True)
        return A, G

    def reduce(self, group: Any = None) -> None:
        """Sum the raw factor sums (before normalisation), counts and rest across ranks.

        The sums of every rank add to the single-process sums on the union of the
        shards. A first collective tells every rank which layers some rank saw and
        the form of their input factor (full or diagonal), so a rank that never saw
        a layer contributes zeros of the right shape. Kept rows are dropped: they
        describe this rank's factors only.
        """
        self.rest.reduce(group)
        groups = list(self.plan.kron)
        seen = all_reduce_sum(
            torch.tensor(
                [
                    [
                        g in self.A,
                        self.A[g].dim() if g in self.A else 0,
                        g in self.G,
                        self.counts.get(g, 0),
                    ]
                    for g in groups
                ],
                dtype=torch.float64,
                device=self.plan.device,
            ).reshape(len(groups), 4),
            group,
        ).tolist()
        for g, (has_a, a_dims, has_g, count) in zip(groups, seen, strict=True):
            n_out, n_cols = self.plan.kron[g].dims(self.plan.layout)
            if has_a:
                diagonal = round(a_dims / has_a) == 1
                zero = self.plan.zeros(n_cols) if diagonal else self.plan.zeros(n_cols, n_cols)
                self.A[g] = all_reduce_sum(self.A.get(g, zero), group)
            if has_g:
                self.G[g] = all_reduce_sum(self.G.get(g, self.plan.zeros(n_out, n_out)), group)
            self.counts[g] = float(count)
        self.rows, self.keep_rows = {}, False

    def build(self, **meta: Any) -> KFAC:  # noqa: D102
        A, G = self.factors()
        rest = self.rest.vector() if self.plan.rest else None
        return KFAC(self.plan.kron, A, G, self.plan.layout, rest, **meta)
