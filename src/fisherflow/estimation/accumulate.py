"""The accumulator protocol: what a pass feeds, and what a structure must implement.

A pass (:func:`~fisherflow.estimation.engine.run_pass`) records every captured layer
use of a batch and calls, for each of its accumulators, :meth:`Accumulator.begin`
once with the batch's records, then :meth:`Accumulator.add` per score (or
:meth:`Accumulator.add_many` for a chunk of scores), then :meth:`Accumulator.end_batch`
once (where sums deferred over the batch's chunks of scores are finished). An
accumulator holds **sums** (so shards add exactly) and implements, besides ``add``:

- :meth:`Accumulator.build`: the :class:`~fisherflow.matrices.FisherMatrix` of the
  sums so far (without disturbing them: more batches may follow);
- :meth:`Accumulator.reduce`: sum its own state across ``torch.distributed`` ranks,
  in place, through :mod:`fisherflow.distributed` (the default sums every tensor of
  ``state``; no code outside an accumulator touches its internals);
- :meth:`Accumulator.end_pass` and :attr:`Accumulator.passes`, for structures that
  need the data more than once (EKFAC).

The concrete accumulators live in :mod:`fisherflow.estimation.accumulators`; this
module holds the protocol, the :class:`Plan` they share and the :class:`Recorder`
that keeps a pass's statistics for replay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from fisherflow.distributed import all_reduce_sum
from fisherflow.estimation.layers import Record
from fisherflow.matrices import FisherMatrix, KronGroup, ParamLayout

__all__ = ["REPLAY_BYTES", "Accumulator", "Pairs", "Plan", "Recorder", "per_row_dict"]

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
    """Base of the accumulators: sums over scores, built into a Fisher matrix.

    Subclasses take the plan and their own options as explicit keyword parameters
    (never ``**options``: a misrouted option is a ``TypeError``), and implement
    :meth:`add` and :meth:`build`; :meth:`begin`, :meth:`add_many`, :meth:`end_batch`,
    :meth:`reduce` and :meth:`end_pass` have defaults.

    Args:
        plan: What the estimate covers.

    Attributes:
        plan: The plan.
        state: Named sums; the default :meth:`reduce` all-reduces each of them.
        passes: Passes over the data the structure needs (class attribute; 2 for
            EKFAC, whose :meth:`end_pass` asks for the data again unless it can
            replay the first pass).
        rows_exact: Whether the sums stay exact when each (row, position) of a
            sequence is fed as its own row (class attribute; the exact kind then
            needs one backward per class for position-local layers, see
            :mod:`fisherflow.estimation.positions`).
        per_layer: Whether a parameter's sums come from its own layer's records
            only, so different layers may come from different backward passes
            (class attribute).
    """

    passes: ClassVar[int] = 1
    rows_exact: ClassVar[bool] = False
    per_layer: ClassVar[bool] = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.state: dict[str, Tensor] = {}
        #: Set by the owner when the next :meth:`build` is this accumulator's last use
        #: (a one-shot :func:`~fisherflow.estimation.estimate`, EKFAC's first pass): the
        #: build may then finish its sums in place and hand them to the result instead
        #: of copying them (a large K-FAC factor is not allocated twice).
        self.final = False

    def begin(self, records: Sequence[Record]) -> None:
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

    def end_batch(self) -> None:
        """Called once per batch after its last score; the default does nothing.

        An accumulator may defer work over a batch's chunks of scores (the diagonal sums
        ``Σ_k δ_k²`` of every chunk before one product with the inputs) and finish it
        here; it must also finish it before any read of its sums.
        """

    def reduce(self, group: Any = None) -> None:
        """Sum the state across the ranks of ``group``, in place (every rank calls it).

        The default sums each tensor of :attr:`state` (same keys and shapes on every
        rank); accumulators with other state override it.
        """
        for k in list(self.state):
            self.state[k] = all_reduce_sum(self.state[k], group)

    def end_pass(self) -> bool:
        """Close a pass over the data; returns whether the data must be streamed again.

        Single-pass structures return ``False`` and may keep accumulating.
        """
        return False

    def build(self, **meta: Any) -> FisherMatrix:
        """The Fisher matrix of the sums so far.

        The sums are left as they are, unless :attr:`final` is set: then they may be
        handed to the result and the accumulator must not be used again.
        """
        raise NotImplementedError


class Recorder(Accumulator):
    """Keeps what a pass fed its accumulators (up to :data:`REPLAY_BYTES`) to replay it.

    Records are kept without their output tensors (so without the autograd graph);
    ``overflow`` is set, and everything dropped, once the budget is exceeded.

    Args:
        plan: What the estimate covers.
        budget: Most bytes kept (default :data:`REPLAY_BYTES` at construction).
    """

    def __init__(self, plan: Plan, budget: int | None = None) -> None:
        super().__init__(plan)
        # read at construction, not import: REPLAY_BYTES may be changed at run time
        self.budget = REPLAY_BYTES if budget is None else budget
        self.used, self.overflow = 0, False
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

    def reduce(self, group: Any = None) -> None:
        """Nothing to sum: the kept statistics are this rank's, replayed on this rank."""

    def replay(self, accs: Sequence[Accumulator]) -> None:
        """Feed the kept statistics to ``accs`` in the original order."""
        for pairs, func, rows, k in self.items:
            for acc in accs:
                if k:
                    acc.add_many(pairs, k, rows)
                else:
                    acc.add(pairs, func, rows)
