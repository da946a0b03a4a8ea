"""The EKFAC accumulator: K-FAC's eigenbasis, then eigenvalue corrections in it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fisherflow.estimation.accumulate import Accumulator, Pairs, Plan, Recorder
from fisherflow.estimation.accumulators.kfac import KFACAcc
from fisherflow.estimation.layers import Record
from fisherflow.matrices import EKFAC, KFAC, FisherMatrix
from fisherflow.matrices.kron import factor_eigh
from fisherflow.matrices.linalg import gram_eigh

__all__ = ["CorrectionAcc", "EKFACAcc"]


def _basis(factor: Tensor, rows: Tensor | None) -> Tensor | None:
    """Eigenvectors of a factor (``None`` for a diagonal one), from its rows when kept."""
    if rows is not None and factor.dim() == 2:
        return gram_eigh(rows.to(factor.dtype))[1]
    return factor_eigh(factor)[1]


class CorrectionAcc(Accumulator):
    """EKFAC's second pass: eigenvalue corrections ``S`` in a fixed K-FAC eigenbasis.

    ``S[g]`` sums, per score, the squares of the layer's per-row gradient matrix
    rotated into the eigenbasis ``Q_Gᵀ ∇W Q_A`` (George et al., 2018).

    Args:
        plan: What the estimate covers.
        kfac: The K-FAC of the first pass (its factors give the eigenbasis).
        rows: The first pass's accumulator, whose kept rows give the eigenbasis of
            small factors faster (``None``: eigendecompose the factors).
    """

    def __init__(self, plan: Plan, kfac: KFAC, rows: KFACAcc | None = None) -> None:
        super().__init__(plan)
        self.kfac = kfac
        self.QA: dict[str, Tensor | None] = {}
        self.QG: dict[str, Tensor | None] = {}
        for g in plan.kron:
            self.QA[g] = _basis(kfac.A[g], None if rows is None else rows.kept_rows("A", g))
            self.QG[g] = _basis(kfac.G[g], None if rows is None else rows.kept_rows("G", g))
            n_out, n_cols = plan.kron[g].dims(plan.layout)
            self.state[g] = plan.zeros(n_out, n_cols)

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:  # noqa: D102
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

    def build(self, **meta: Any) -> FisherMatrix:  # noqa: D102
        k = self.kfac
        rest = k.rest if k.rest_names else None
        S = {g: s.clone() for g, s in self.state.items()}
        return EKFAC(k.kron_groups, self.QA, self.QG, S, k.layout, rest, **meta)


class EKFACAcc(Accumulator):
    """EKFAC in two passes: K-FAC factors, then eigenvalue corrections in their eigenbasis.

    The first pass feeds a :class:`~fisherflow.estimation.accumulators.KFACAcc`
    (keeping the vectors of small factors, for fast eigenbases) and a
    :class:`~fisherflow.estimation.accumulate.Recorder`. :meth:`end_pass` then fixes
    the eigenbasis and, when the first pass's layer inputs and output gradients fit
    the recorder's budget, replays them into the corrections (the same MC labels)
    and returns ``False``; otherwise it returns ``True``: stream the data again.

    Across ranks, :meth:`reduce` after each pass sums that pass's statistics; a
    replay after a reduced first pass is reduced in the same group by
    :meth:`end_pass` (every rank replays its own shard at the same point).

    Args:
        plan: What the estimate covers.
        replay_bytes: The recorder's budget (default
            :data:`~fisherflow.estimation.accumulate.REPLAY_BYTES`).
    """

    rows_exact = True  # positions fed as rows stay exact (outer products of rows)
    per_layer = True  # each parameter from its own records

    passes = 2

    def __init__(self, plan: Plan, replay_bytes: int | None = None) -> None:
        super().__init__(plan)
        self.factors = KFACAcc(plan, keep_rows=True)
        self.recorder: Recorder | None = Recorder(plan, replay_bytes)
        self.corrections: CorrectionAcc | None = None
        #: What the current pass feeds (in this order).
        self._feeding: list[Accumulator] = [self.factors, self.recorder]
        #: ``[group]`` once the first pass was all-reduced in ``group``.
        self._reduced_in: list[Any] = []

    def begin(self, records: Sequence[Record]) -> None:  # noqa: D102
        for acc in self._feeding:
            acc.begin(records)

    def add(self, pairs: Pairs, func: Mapping[str, Tensor], rows: int) -> None:  # noqa: D102
        for acc in self._feeding:
            acc.add(pairs, func, rows)

    def add_many(self, pairs: Pairs, k: int, rows: int) -> None:  # noqa: D102
        for acc in self._feeding:
            acc.add_many(pairs, k, rows)

    def end_batch(self) -> None:  # noqa: D102
        for acc in self._feeding:
            acc.end_batch()

    def reduce(self, group: Any = None) -> None:
        """Sum the current pass's statistics across ranks (factors, then corrections)."""
        if self.corrections is None:
            self._reduced_in = [group]
        for acc in self._feeding:
            acc.reduce(group)

    def end_pass(self) -> bool:
        """Close a pass: after the first, fix the eigenbasis and replay if it can.

        Returns:
            ``True`` if the data must be streamed again (the first pass's statistics
            exceeded the replay budget), else ``False`` (the estimate is complete).
        """
        if self.corrections is not None:
            return False
        recorder, self.recorder = self.recorder, None
        self.factors.final = True  # never fed again: its sums become the basis's factors
        self.corrections = CorrectionAcc(self.plan, self.factors.build(), rows=self.factors)
        self._feeding = [self.corrections]
        if recorder is None or recorder.overflow:
            return True
        recorder.replay([self.corrections])
        for group in self._reduced_in:
            self.corrections.reduce(group)
        return False

    def build(self, **meta: Any) -> FisherMatrix:
        """The EKFAC of the corrections (after :meth:`end_pass`).

        Raises:
            RuntimeError: If the first pass is still open.
        """
        if self.corrections is None:
            raise RuntimeError("EKFAC's first pass is still open: call end_pass() first")
        return self.corrections.build(**meta)
