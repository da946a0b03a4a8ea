"""The diagonal accumulator: ``Σ_n g_n²`` per parameter entry."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fisherflow.distributed import all_reduce_sum
from fisherflow.estimation.accumulate import Accumulator, Pairs, Plan, per_row_dict
from fisherflow.estimation.layers import Record
from fisherflow.matrices import Diagonal, FisherMatrix

__all__ = ["DiagonalAcc"]


def _one_position(rec: Record, d: Tensor) -> bool:
    """Whether the diagonal of ``rec`` depends on ``d`` only through ``d²`` elementwise."""
    return d.shape[1] == 1 and rec.rows is None and rec.handler.squared_diag


class DiagonalAcc(Accumulator):
    """``Σ_n g_n²``: fast per-layer formulas when a parameter has a single use.

    ``state`` holds a parameter's sum once it has one: the first contribution is
    kept as is (handlers return new tensors), later ones are added in place.

    Args:
        plan: What the estimate covers.
        names: The parameters to accumulate (default every parameter of the plan).
    """

    rows_exact = True  # positions fed as rows stay exact (outer products of rows)
    per_layer = True  # each parameter from its own records

    def __init__(self, plan: Plan, names: Sequence[str] | None = None) -> None:
        super().__init__(plan)
        self.names = list(plan.layout.names if names is None else names)
        self.keep = set(self.names)
        #: ``{id(record): (record, weight name, bias name, Σ_k δ_k²)}`` of the batch's
        #: single-use one-position layers fed by :meth:`add_many`: the squared output
        #: gradients of every chunk of scores are summed first, and the layer's diagonal
        #: (one product with the squared inputs) is taken once per batch, by :meth:`flush`
        #: (from :meth:`end_batch`, and before any read).
        self.pending: dict[int, tuple[Record, str, str | None, Tensor]] = {}

    def begin(self, records: Sequence[Record]) -> None:  # noqa: D102
        self.flush()

    def end_batch(self) -> None:  # noqa: D102
        self.flush()

    def flush(self) -> None:
        """Turn the pending ``Σ_k δ_k²`` into diagonals (at the end of a batch, before reads)."""
        for rec, wn, bn, sq in self.pending.values():
            fast = rec.handler.diag(rec, sq.sqrt_())
            assert fast is not None
            self._add_diag(wn, bn, fast)
        self.pending = {}

    def _accumulate(self, name: str, value: Tensor) -> None:
        held = self.state.get(name)
        if held is None:
            self.state[name] = value
        else:
            held += value

    def _kept(self, pairs: Pairs) -> Iterator[tuple[Record, Tensor, str, str | None, bool]]:
        """Records of kept weights with their names and whether weight and bias are used once.

        A parameter used by several records in a batch (a layer applied twice, tied
        weights) must have its per-row gradient summed over uses before squaring.
        """
        uses: dict[str, int] = {}
        for rec, _ in pairs:
            for p in (rec.weight, rec.bias):
                if p is not None:
                    n = self.plan.name_of[id(p)]
                    uses[n] = uses.get(n, 0) + 1
        for rec, d in pairs:
            wn = self.plan.name_of[id(rec.weight)]
            if wn not in self.keep:
                continue
            bn = None if rec.bias is None else self.plan.name_of[id(rec.bias)]
            yield rec, d, wn, bn, uses[wn] == 1 and (bn is None or uses[bn] == 1)

    def _add_diag(self, wn: str, bn: str | None, fast: tuple[Tensor, Tensor | None]) -> None:
        self._accumulate(wn, fast[0])
        if bn is not None and fast[1] is not None:
            self._accumulate(bn, fast[1])

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:  # noqa: D102
        slow: list[tuple[Record, Tensor]] = []
        for rec, d, wn, bn, once in self._kept(pairs):
            fast = rec.handler.diag(rec, d) if once and rec.rows is None else None
            if fast is None:
                slow.append((rec, d))
            else:
                self._add_diag(wn, bn, fast)
        for n, g in per_row_dict(self.plan, slow, func, self.keep).items():
            self._accumulate(n, (g * g).sum(0))

    def add_many(self, pairs: Pairs, k: int, rows: int) -> None:
        """Single-use, one-position layers with ``squared_diag`` handlers: ``Σ_k δ_k²`` first.

        The sum runs over every chunk of the batch (:attr:`pending`), so chunking the
        scores does not multiply the products with the inputs.
        """
        rest: list[tuple[Record, Tensor]] = []
        for rec, d, wn, bn, once in self._kept(pairs):
            if not (once and _one_position(rec, d)):
                rest.append((rec, d))
                continue
            sq = (d * d).reshape(k, rows, *d.shape[1:]).sum(0)
            held = self.pending.get(id(rec))
            if held is None:
                self.pending[id(rec)] = (rec, wn, bn, sq)
            else:
                held[3].add_(sq)
        if rest:
            super().add_many(rest, k, rows)

    def vector(self) -> Tensor:
        """The accumulated diagonal, flat in the order of ``names`` (zeros where unseen)."""
        self.flush()
        layout = self.plan.layout
        parts = [
            self.state[n].reshape(-1)
            if n in self.state
            else self.plan.zeros(math.prod(layout.shape(n)))
            for n in self.names
        ]
        return torch.cat(parts) if parts else self.plan.zeros(0)

    def set_vector(self, vector: Tensor) -> None:
        """Replace the sums by a flat vector in the order of ``names`` (e.g. all-reduced)."""
        self.pending = {}
        layout = self.plan.layout
        sizes = [math.prod(layout.shape(n)) for n in self.names]
        self.state = {
            n: v.view(layout.shape(n)) for n, v in zip(self.names, vector.split(sizes), strict=True)
        }

    def reduce(self, group: Any = None) -> None:
        """One collective for the flat diagonal (zeros where a rank saw nothing)."""
        self.set_vector(all_reduce_sum(self.vector(), group))

    def build(self, **meta: Any) -> FisherMatrix:  # noqa: D102
        return Diagonal(self.vector(), self.plan.layout, **meta)
