"""Streaming accumulators: per-row gradients of each score → a structured Fisher.

Every accumulator holds *sums* (so shards add exactly), consumes one score at a time
(``add``), and builds its :class:`~fisherflow.matrices.FisherMatrix` at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from fisherflow.estimation.layers import (
    ConvHandler,
    LayerNormHandler,
    LinearHandler,
    Record,
    gram_into,
    symmetrize,
)
from fisherflow.matrices import (
    EKFAC,
    KFAC,
    Block,
    Dense,
    Diagonal,
    FisherMatrix,
    KronGroup,
    LowRank,
    ParamLayout,
    orthonormal_factor,
)
from fisherflow.matrices.kron import factor_eigh
from fisherflow.matrices.linalg import gram_eigh

__all__ = ["ACCUMULATORS", "REPLAY_BYTES", "Plan", "Recorder", "per_row_dict"]

#: Most bytes of a first pass's statistics (layer inputs and output gradients) kept
#: by :class:`Recorder` so that EKFAC's second pass replays them instead of running
#: forward and backward again; past it the second pass streams over the data.
REPLAY_BYTES = 2**28

Pairs = Sequence[tuple[Record, Tensor]]


class Plan:
    """What an estimate covers: layout, per-parameter names, groups and Kronecker layers.

    Args:
        layout: The parameter layout.
        name_of: ``{id(parameter): name}``.
        groups: ``{group: [names]}`` one group per module (block structure).
        kron: ``{group: KronGroup}`` for K-FAC/EKFAC.
        dtype: Statistics dtype.
        device: Statistics device.
        reduce: K-FAC sequence convention (``False`` = expand).
    """

    def __init__(
        self,
        layout: ParamLayout,
        name_of: Mapping[int, str],
        groups: Mapping[str, list[str]],
        kron: Mapping[str, KronGroup],
        dtype: torch.dtype,
        device: torch.device,
        reduce: bool = False,
    ) -> None:
        self.layout, self.name_of = layout, dict(name_of)
        self.groups, self.kron = dict(groups), dict(kron)
        self.dtype, self.device, self.reduce = dtype, device, reduce
        self.group_of_weight = {s.weight: g for g, s in kron.items()}
        covered = {n for s in kron.values() for n in s.names}
        self.rest = [n for n in layout.names if n not in covered]

    def zeros(self, *shape: int) -> Tensor:
        """A zero tensor in the statistics dtype and device."""
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)


def _place(
    acc: dict[str, Tensor],
    name: str,
    g: Tensor,
    rows: slice | None,
    major: bool,
    shape: tuple[int, ...],
) -> None:
    if rows is None:
        acc[name] = acc[name] + g if name in acc else g
        return
    if name not in acc:
        acc[name] = torch.zeros(g.shape[0], *shape, dtype=g.dtype, device=g.device)
    if major and len(shape) == 2:
        acc[name][:, :, rows] += g
    else:
        acc[name][:, rows] += g


def per_row_dict(
    plan: Plan, pairs: Pairs, func: Mapping[str, Tensor], names: set[str] | None = None
) -> dict[str, Tensor]:
    """``{name: (B, *shape)}`` per-row gradients summed over every use of a parameter."""
    acc: dict[str, Tensor] = {}
    for rec, d in pairs:
        wn = plan.name_of[id(rec.weight)]
        if names is not None and wn not in names:
            continue
        w, b = rec.handler.per_row(rec, d)
        _place(acc, wn, w, rec.rows, rec.handler.input_major, tuple(rec.weight.shape))
        if b is not None and rec.bias is not None:
            _place(acc, plan.name_of[id(rec.bias)], b, rec.rows, False, tuple(rec.bias.shape))
    for n, g in func.items():
        if names is None or n in names:
            acc[n] = acc[n] + g if n in acc else g
    return acc


class Accumulator:
    """Base: sums over scores; subclasses define ``add`` and ``build``."""

    def __init__(self, plan: Plan, **options: Any) -> None:
        self.plan = plan
        self.state: dict[str, Tensor] = {}

    def begin(self, pairs: Sequence[Record]) -> None:
        """Called once per batch with its records (input-side statistics)."""

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:
        """Consume one score's per-record output gradients and fallback gradients."""
        raise NotImplementedError

    def add_many(self, pairs: Pairs, k: int, rows: int) -> None:
        """Consume ``k`` scores at once: each ``d`` is ``(k·rows, …)``, score-major.

        The default slices the scores apart and calls :meth:`add` for each.
        """
        for i in range(k):
            sl = [(rec, d[i * rows : (i + 1) * rows]) for rec, d in pairs]
            self.add(sl, {}, rows)

    def build(self, **meta: Any) -> FisherMatrix:
        """The Fisher matrix from the accumulated sums."""
        raise NotImplementedError


def _one_position(rec: Record, d: Tensor) -> bool:
    """Whether the diagonal of ``rec`` depends on ``d`` only through ``d²`` elementwise."""
    return (
        d.shape[1] == 1
        and rec.rows is None
        and isinstance(rec.handler, (LinearHandler, LayerNormHandler))
        and not isinstance(rec.handler, ConvHandler)
    )


class DiagonalAcc(Accumulator):
    """``Σ_n g_n²``: fast per-layer formulas when a parameter has a single use.

    ``state`` holds a parameter's sum once it has one: the first contribution is
    kept as is (handlers return new tensors), later ones are added in place.
    """

    def __init__(self, plan: Plan, names: Sequence[str] | None = None, **options: Any) -> None:
        super().__init__(plan)
        self.names = list(plan.layout.names if names is None else names)
        self.keep = set(self.names)

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

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:
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
        """Single-use, one-position Linear/norm layers: ``Σ_k δ_k²`` first (one matmul)."""
        rest: list[tuple[Record, Tensor]] = []
        for rec, d, wn, bn, once in self._kept(pairs):
            if not (once and _one_position(rec, d)):
                rest.append((rec, d))
                continue
            d_eff = (d * d).reshape(k, rows, *d.shape[1:]).sum(0).sqrt()
            fast = rec.handler.diag(rec, d_eff)
            assert fast is not None
            self._add_diag(wn, bn, fast)
        if rest:
            super().add_many(rest, k, rows)

    def vector(self) -> Tensor:
        """The accumulated diagonal, flat in the order of ``names`` (zeros where unseen)."""
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
        layout = self.plan.layout
        sizes = [math.prod(layout.shape(n)) for n in self.names]
        self.state = {
            n: v.view(layout.shape(n)) for n, v in zip(self.names, vector.split(sizes), strict=True)
        }

    def build(self, **meta: Any) -> FisherMatrix:
        return Diagonal(self.vector(), self.plan.layout, **meta)


class GroupAcc(Accumulator):
    """Dense blocks ``Σ_n g_n g_nᵀ`` per group (one group = the whole layout for dense)."""

    def __init__(self, plan: Plan, dense: bool = False, **options: Any) -> None:
        super().__init__(plan)
        self.dense = dense
        self.groups = {"all": list(plan.layout.names)} if dense else plan.groups
        for g, names in self.groups.items():
            size = plan.layout.subset(names).size
            self.state[g] = plan.zeros(size, size)  # a gram_into accumulator

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:
        rowd = per_row_dict(self.plan, pairs, func)
        for g, names in self.groups.items():
            parts = [
                rowd[n].reshape(rows, -1)
                if n in rowd
                else self.plan.zeros(rows, self.plan.layout.subset([n]).size)
                for n in names
            ]
            self.state[g] = gram_into(self.state[g], torch.cat(parts, 1))

    def build(self, **meta: Any) -> FisherMatrix:
        blocks = {g: symmetrize(m) for g, m in self.state.items()}
        if self.dense:
            return Dense(blocks["all"], self.plan.layout, **meta)
        return Block(blocks, self.groups, self.plan.layout, **meta)


class LowRankAcc(Accumulator):
    """A streaming sketch ``B Bᵀ`` of ``Σ_n g_n g_nᵀ``, truncated to ``rank`` at the end.

    Per-row gradients are appended as columns of ``B``; when ``B`` grows past
    ``4·keep`` columns it is compressed to its top ``keep = max(2·rank, rank + 16)``
    eigen-directions (exact while the total number of scores is at most ``keep``).
    """

    def __init__(self, plan: Plan, rank: int = 10, **options: Any) -> None:
        super().__init__(plan)
        self.rank = rank
        self.keep = min(plan.layout.size, max(2 * rank, rank + 16))
        self.cols: list[Tensor] = []
        self.width = 0

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:
        rowd = per_row_dict(self.plan, pairs, func)
        parts = [
            rowd[n].reshape(rows, -1)
            if n in rowd
            else self.plan.zeros(rows, self.plan.layout.subset([n]).size)
            for n in self.plan.layout.names
        ]
        self.cols.append(torch.cat(parts, 1).T)
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

    def build(self, **meta: Any) -> FisherMatrix:
        U, s = orthonormal_factor(self.factor(), min(self.rank, self.plan.layout.size))
        return LowRank(U, s, self.plan.layout, **meta)


class KFACAcc(Accumulator):
    """K-FAC factors (expand or reduce convention) and the rest's exact diagonal."""

    def __init__(self, plan: Plan, keep_rows: bool = False, **options: Any) -> None:
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

    def begin(self, records: Sequence[Record]) -> None:
        for rec in records:
            g = self._group(rec)
            if g is None:
                continue
            self.A[g], m = rec.handler.factor_a(rec, self.plan.reduce, self.A.get(g))
            self.counts[g] = self.counts.get(g, 0) + m
            if self.keep_rows:
                side = self.A[g].shape[0]
                self._keep(("A", g), rec.handler.rows_a(rec, self.plan.reduce), side)

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

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:
        grouped, rest = self._split(pairs)
        for g, rec, d in grouped:
            self._add_g(g, rec, d)
        self.rest.add(rest, func, rows)

    def add_many(self, pairs: Pairs, k: int, rows: int) -> None:
        """``G`` of ``k`` scores from one ``(k·rows·S, n_out)`` product per layer."""
        grouped, rest = self._split(pairs)
        for g, rec, d in grouped:
            if not isinstance(rec.handler, LinearHandler):
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
        block += symmetrize(rec.handler.factor_g(rec, d, self.plan.reduce))
        self.G[g][rec.rows, rec.rows] = block

    def kept_rows(self, side: str, group: str) -> Tensor | None:
        """All kept rows of a factor (``side`` ``"A"`` or ``"G"``), or ``None``."""
        held = self.rows.get((side, group))
        return torch.cat(held) if held else None

    def factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(A, G)`` with ``A`` the mean over input vectors and ``G`` the sum.

        Consumes the accumulators (symmetrised and scaled in place): call once, at the end.
        """
        A, G = {}, {}
        for g, spec in self.plan.kron.items():
            n_out, n_cols = spec.dims(self.plan.layout)
            A[g] = (
                symmetrize(self.A[g]).div_(max(self.counts.get(g, 0), 1))
                if g in self.A
                else self.plan.zeros(n_cols, n_cols)
            )
            G[g] = symmetrize(self.G[g]) if g in self.G else self.plan.zeros(n_out, n_out)
        return A, G

    def build(self, **meta: Any) -> FisherMatrix:
        A, G = self.factors()
        rest = self.rest.vector() if self.plan.rest else None
        return KFAC(self.plan.kron, A, G, self.plan.layout, rest, **meta)


def _basis(factor: Tensor, rows: Tensor | None) -> Tensor | None:
    """Eigenvectors of a factor (``None`` for a diagonal one), from its rows when kept."""
    if rows is not None and factor.dim() == 2:
        return gram_eigh(rows.to(factor.dtype))[1]
    return factor_eigh(factor)[1]


class EKFACAcc(Accumulator):
    """Second pass of EKFAC: eigenvalue corrections ``S`` in a fixed K-FAC eigenbasis."""

    def __init__(
        self,
        plan: Plan,
        kfac: KFAC | None = None,
        rows: KFACAcc | None = None,
        **options: Any,
    ) -> None:
        super().__init__(plan)
        if kfac is None:
            raise ValueError("EKFAC needs the K-FAC factors of a first pass")
        self.kfac = kfac
        self.QA: dict[str, Tensor | None] = {}
        self.QG: dict[str, Tensor | None] = {}
        for g in plan.kron:
            self.QA[g] = _basis(kfac.A[g], None if rows is None else rows.kept_rows("A", g))
            self.QG[g] = _basis(kfac.G[g], None if rows is None else rows.kept_rows("G", g))
            n_out, n_cols = plan.kron[g].dims(plan.layout)
            self.state[g] = plan.zeros(n_out, n_cols)

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:
        by_group: dict[str, list[tuple[Record, Tensor]]] = {}
        for rec, d in pairs:
            g = self.plan.group_of_weight.get(self.plan.name_of[id(rec.weight)])
            if g is not None:
                by_group.setdefault(g, []).append((rec, d))
        for g, items in by_group.items():
            qa, qg = self.QA[g], self.QG[g]
            if len(items) == 1 and items[0][0].rows is None:
                rec, d = items[0]
                self.state[g] += rec.handler.ekfac(rec, d, qa, qg)
                continue
            n_out, n_cols = self.plan.kron[g].dims(self.plan.layout)
            x = self.plan.zeros(rows, n_out, n_cols)
            for rec, d in items:
                m = rec.handler.matrix(rec, d)
                if rec.rows is None:
                    x += m
                else:
                    x[:, rec.rows] += m
            if qg is not None:
                x = qg.T @ x
            if qa is not None:
                x = x @ qa
            self.state[g] += (x * x).sum(0)

    def build(self, **meta: Any) -> FisherMatrix:
        k = self.kfac
        rest = k.rest if k.rest_names else None
        return EKFAC(k.kron_groups, self.QA, self.QG, dict(self.state), k.layout, rest, **meta)


class Recorder(Accumulator):
    """Keeps what a pass fed its accumulators (up to :data:`REPLAY_BYTES`) to replay it.

    Records are kept without their output tensors (so without the autograd graph);
    ``overflow`` is set, and everything dropped, once the budget is exceeded.
    """

    def __init__(self, plan: Plan, budget: int = REPLAY_BYTES, **options: Any) -> None:
        super().__init__(plan)
        self.budget, self.used, self.overflow = budget, 0, False
        self.items: list[tuple[list[tuple[Record, Tensor]], Mapping[str, Tensor], int, int]] = []
        self._seen: dict[int, Record] = {}
        self._empty = torch.empty(0)

    def begin(self, records: Sequence[Record]) -> None:  # noqa: D102
        self._seen = {}

    def _keep(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int, k: int) -> None:
        if self.overflow:
            return
        kept = []
        for rec, d in pairs:
            slim = self._seen.get(id(rec))
            if slim is None:
                slim = replace(rec, output=self._empty)
                self._seen[id(rec)] = slim
                self.used += rec.data.numel() * rec.data.element_size()
            self.used += d.numel() * d.element_size()
            kept.append((slim, d))
        self.used += sum(g.numel() * g.element_size() for g in func.values())
        if self.used > self.budget:
            self.overflow, self.items, self._seen = True, [], {}
            return
        self.items.append((kept, dict(func), rows, k))

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:  # noqa: D102
        self._keep(pairs, func, rows, 0)

    def add_many(self, pairs: Pairs, k: int, rows: int) -> None:  # noqa: D102
        self._keep(pairs, {}, rows, k)

    def replay(self, accs: Sequence[Accumulator]) -> None:
        """Feed the kept statistics to ``accs`` in the original order."""
        for pairs, func, rows, k in self.items:
            for acc in accs:
                if k:
                    acc.add_many(pairs, k, rows)
                else:
                    acc.add(pairs, func, rows)


#: Accumulator classes by structure name.
ACCUMULATORS: dict[str, type[Accumulator]] = {
    "diagonal": DiagonalAcc,
    "dense": GroupAcc,
    "block": GroupAcc,
    "lowrank": LowRankAcc,
    "kfac": KFACAcc,
    "ekfac": EKFACAcc,
}
