"""One pass over the data: forward with capture, one backward per score, accumulate.

The plan (:mod:`~fisherflow.estimation.plan`) and the hook check
(:mod:`~fisherflow.estimation.hookcheck`) live in their own modules; their public
names are re-exported here, where :func:`run_pass` has always been imported from.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation.accumulate import Accumulator
from fisherflow.estimation.capture import Capture
from fisherflow.estimation.checks import check_inputs, check_output
from fisherflow.estimation.data import (
    Forward,
    batch_rows,
    output_note,
    output_tensor,
    split_batch,
    to_device,
)
from fisherflow.estimation.hookcheck import (
    CHECK_TOL,
    Check,
    Recheck,
    clear_probe_cache,
    mismatched,
    probe,
)
from fisherflow.estimation.hookcheck import check_first_batch as _check_first_batch
from fisherflow.estimation.layers import Record
from fisherflow.estimation.layers import record_deltas as _pairs
from fisherflow.estimation.likelihoods import Likelihood
from fisherflow.estimation.persample import (
    VMAP_UNSUPPORTED,
    per_row_grads,
    per_row_grads_loop,
)
from fisherflow.estimation.plan import build_plan, input_signature, model_signature
from fisherflow.estimation.positions import (
    CostTimer,
    as_rows,
    delta_rows,
    local_weights,
)
from fisherflow.estimation.reference import Wrapped
from fisherflow.estimation.scores import Scores, make_scores

__all__ = [
    "BATCH_ELEMENTS",
    "BATCH_MEMORY",
    "BATCH_MIN_BYTES",
    "CHECK_TOL",
    "Check",
    "Recheck",
    "build_plan",
    "chunk_scores",
    "clear_probe_cache",
    "mismatched",
    "model_signature",
    "probe",
    "run_pass",
]


def run_pass(
    model: nn.Module,
    data: Iterable[Any],
    capture: Capture,
    accs: list[Accumulator],
    *,
    lik: Likelihood,
    kind: str,
    mc_samples: int,
    generator: torch.Generator | None,
    forward: Forward,
    shift_labels: bool | None,
    device: torch.device,
    stat: torch.dtype,
    progress: Any = None,
    check: Check | None = None,
) -> int:
    """Stream over ``data`` once, feeding every accumulator; returns the observation count.

    With a pending ``check`` (see :func:`probe`), the first batch is also the hook
    check: :class:`Recheck` is raised, before any accumulator is fed, if it demotes
    parameters. Every batch is checked (:mod:`~fisherflow.estimation.checks`); a
    tuple output or an unshifted ``(ids, ids)`` pair gets a
    :class:`~fisherflow.estimation.data.DataNotice` once per estimate (the capture
    remembers the notices and numbers the batches since its reset).

    Raises:
        Recheck: If the hook check demotes parameters.
        ValueError: For a bad batch (empty, unbatched, ambiguous batch size, NaN/Inf
            inputs or outputs, targets without the batch in dimension 0 or outside
            the likelihood's support). A pass with no observation at all (every
            target masked) is refused by the estimator's ``result()``, not here.
    """
    total = 0
    with capture:
        for item in data:
            batch = split_batch(item, shift_labels)
            inputs = to_device(batch.inputs, device)
            targets = None if batch.targets is None else batch.targets.to(device)
            rows = batch_rows(inputs, targets)
            check_inputs(inputs, capture.batches)
            capture.start(rows)
            with torch.enable_grad():
                raw = forward(model, inputs)
            out = output_tensor(raw)
            check_output(out, rows, targets, capture.batches)
            for note in (batch.note, output_note(raw)):
                if note is not None:
                    capture.notice_data(note)
            capture.batches += 1
            if check is not None:
                out = _check_first_batch(check, model, inputs, rows, capture, forward, out, stat)
                check = None
            if capture.failed:
                capture.demote(capture.failed, "inputs without the batch in dimension 0")
                capture.start(rows)
                with torch.enable_grad():
                    out = output_tensor(forward(model, inputs))
            records = [
                r for r in capture.records if capture.name_of[id(r.weight)] in capture.hooked
            ]
            scores = make_scores(lik, out, targets, kind, rows, mc_samples, generator, stat)
            total += scores.count
            for acc in accs:
                acc.begin(records)
            key_parts = (inputs, forward, shift_labels)
            split = _split_local(capture, records, scores, accs, out, key_parts)
            timer = CostTimer(
                *_cost(scores, split, capture),
                kind == "exact" and capture.batches == 1,
                out.device,
            )
            if split is not None:  # the position-local layers: one backward per class
                local, records = split
                _batched(
                    out, local, scores.per_class(), accs, rows, stat, scores.layout, timer.tick
                )
            if split is None or records or capture.fallback:
                cots = [c.to(out.dtype) for c in scores] if capture.fallback else None
                func_all: dict[str, Tensor] = {}
                if capture.fallback and cots:
                    with capture.pause():  # torch.func re-runs the model: hooks stay quiet
                        func_all = _fallback(
                            capture, model, forward, inputs, torch.stack(cots), rows
                        )
                _per_score(out, records, scores, accs, rows, stat, func_all, cots, timer.tick)
            for acc in accs:
                acc.end_batch()
            timer.done()
            if progress is not None:
                progress.update(1)
    return total


def _per_score(
    out: Tensor,
    records: list[Record],
    scores: Scores,
    accs: list[Accumulator],
    rows: int,
    stat: torch.dtype,
    func_all: dict[str, Tensor],
    cots: list[Tensor] | None,
    tick: Callable[[int], None] | None = None,
) -> None:
    """One backward per score (batched in chunks when there is no fallback).

    ``tick(n)`` is told of every ``n`` passes run (the cost notice's clock).
    """
    if cots is None and scores.size > 1 and records:
        _batched(out, records, scores, accs, rows, stat, tick=tick)
        return
    outs = [r.output for r in records]
    for k, cot in enumerate(cots if cots is not None else scores):
        cot = cot.to(out.dtype)
        # the graph is freed by the last score's backward (as in a plain step)
        last = k + 1 == scores.size
        grads = (
            torch.autograd.grad(out, outs, cot, retain_graph=not last, allow_unused=True)
            if outs
            else []
        )
        pairs = _pairs(records, grads, stat)
        func = {n: g[k].to(stat) for n, g in func_all.items()}
        for acc in accs:
            acc.add(pairs, func, rows)
        if tick is not None:
            tick(1)


def _fallback(
    capture: Capture, model: nn.Module, forward: Forward, inputs: Any, cots: Tensor, rows: int
) -> dict[str, Tensor]:
    """Per-row gradients of the parameters left to ``torch.func``: ``vmap``, else a loop.

    The loop over rows (:func:`~fisherflow.estimation.persample.per_row_grads_loop`)
    serves models ``vmap`` cannot run: those with a module of
    :data:`~fisherflow.estimation.persample.VMAP_UNSUPPORTED` among the fallback's
    owners, and any whose ``vmap`` fails (decided on the first batch, kept for the
    pass), with a one-time notice that it is slow.
    """
    wrapped, params = Wrapped(model, forward), dict(model.named_parameters())
    if capture.loop is None:
        mods = dict(model.named_modules())
        owners = {capture.owner.get(n, "") for n in capture.fallback}
        slow = [o for o in sorted(owners) if isinstance(mods.get(o), VMAP_UNSUPPORTED)]
        capture.loop = bool(slow)
        if slow:
            capture.notice_loop(f"torch.func.vmap cannot run {slow[:3]}")
    if not capture.loop:
        try:
            return per_row_grads(wrapped, capture.fallback, params, inputs, cots, rows)
        except RuntimeError as err:
            capture.loop = True
            capture.notice_loop(f"torch.func.vmap failed: {err.__cause__ or err}"[:300])
    return per_row_grads_loop(wrapped, capture.fallback, params, inputs, cots, rows)


#: Most output-gradient entries held at once by a batched backward (chunks of scores).
BATCH_ELEMENTS = 2**25

#: Most bytes of output gradients held at once by a batched backward, as a multiple of
#: the bytes the batch's records already hold (their saved inputs and outputs: what the
#: capture keeps of one forward, about what a plain forward+backward holds). A chunk of
#: ``k`` scores holds ``k`` copies of the records' output gradients, and about as much
#: again in the backward's intermediates and the accumulators' temporaries, so 0.5 adds
#: about one more forward+backward's worth to the peak. Measured on the README's
#: benchmarks (one thread, CPU time, interleaved; ``bench/RESULTS_estimate.md``): the
#: 64-256-256-10 MLP (batch 512) gets ``k = 1`` of its 10 classes per backward, peak
#: 18 → 6 MB; the conv16-conv32-linear CNN (batch 128) ``k = 2``, exact K-FAC 49 → 32
#: MB, exact diagonal 28 → 16 MB; neither slower (the exact diagonal sums ``Σ_k δ_k²``
#: over every chunk before its one product with the inputs,
#: :class:`~fisherflow.estimation.accumulators.DiagonalAcc`). Chunking changes only
#: the order of float sums (results equal to rounding).
BATCH_MEMORY = 0.5

#: Bytes of output gradients a batched backward may hold whatever :data:`BATCH_MEMORY`
#: allows (1 MiB): on a small model one score per backward costs far more in per-pass
#: overhead than its memory saves. The README's 20-32-10 MLP (batch 512, 86 kB per
#: score) then takes its 10 classes in one backward: exact K-FAC 6.5 → 3.4 ms, exact
#: diagonal 5.9 → 3.2 ms (one thread, CPU time); the larger benchmark MLP and CNN
#: (1.1 and 1.6 MB per score) are unchanged.
BATCH_MIN_BYTES = 2**20


def chunk_scores(records: list[Record], scores: int) -> int:
    """Scores per batched backward: within :data:`BATCH_ELEMENTS` and the memory budget.

    The budget is :data:`BATCH_MEMORY` × the bytes the records hold, or
    :data:`BATCH_MIN_BYTES` when that is more.

    Args:
        records: The records whose output gradients the backward returns.
        scores: The number of scores (cotangents) to backpropagate.

    Returns:
        ``k`` between 1 and ``scores``.

    Example:
        >>> import torch
        >>> from fisherflow.estimation.layers import Record
        >>> rows = 2**16  # one score's output gradients: 2**16 · 8 · 4 B = 2 MiB
        >>> data, out = torch.zeros(rows, 12, device="meta"), torch.zeros(rows, 8, device="meta")
        >>> chunk_scores([Record(None, torch.zeros(1), None, data, out)], 10)  # 0.5 · 5 MiB
        1
        >>> small = Record(None, torch.zeros(1), None, torch.zeros(4, 3), torch.zeros(4, 2))
        >>> chunk_scores([small], 10)  # 32 B per score: all 10 within BATCH_MIN_BYTES
        10
    """
    per = max(1, sum(r.output.numel() for r in records))
    per_bytes = max(1, sum(r.output.numel() * r.output.element_size() for r in records))
    held = sum(
        t.numel() * t.element_size()
        for r in records
        for t in (r.data, r.output)
        if isinstance(t, Tensor)
    )
    by_memory = max(int(BATCH_MEMORY * held), BATCH_MIN_BYTES) // per_bytes
    return max(1, min(scores, BATCH_ELEMENTS // per, by_memory))


def _split_local(
    capture: Capture,
    records: list[Record],
    scores: Scores,
    accs: list[Accumulator],
    out: Tensor,
    key_parts: tuple[Any, Forward, bool | None],
) -> tuple[list[Record], list[Record]] | None:
    """``(position-local records, the others)`` when the class passes serve the local ones.

    ``None`` (every record takes the per-score passes) unless the scores are the exact
    kind's over several positions, every accumulator is exact on positions as rows
    (:attr:`~fisherflow.estimation.accumulate.Accumulator.rows_exact`) and some record
    is local; with non-local records or fallback parameters left, the accumulators must
    also be per layer (:attr:`~fisherflow.estimation.accumulate.Accumulator.per_layer`).
    """
    layout = scores.layout
    if layout is None or layout[1] < 2 or not records or not accs:
        return None
    if not all(a.rows_exact for a in accs):
        return None
    inputs, forward, shift = key_parts
    sig_in = input_signature(inputs)
    key = None
    if sig_in is not None:
        hooked = tuple(sorted(capture.hooked))
        key = (hooked, id(forward), sig_in, shift, layout, out.shape, torch.is_grad_enabled())
    local = local_weights(out, records, capture.name_of, layout, key, capture)
    mine = [r for r in records if capture.name_of[id(r.weight)] in local]
    rest = [r for r in records if capture.name_of[id(r.weight)] not in local]
    if not mine or ((rest or capture.fallback) and not all(a.per_layer for a in accs)):
        return None
    return mine, rest


def _cost(
    scores: Scores, split: tuple[list[Record], list[Record]] | None, capture: Capture
) -> tuple[int, str]:
    """Backward passes of a batch and which layers paid which price (for the notice)."""
    if scores.layout is None:
        return scores.size, ""
    if split is None:
        return scores.size, "every layer takes one per (position, class)"
    local, rest = split
    per_class = scores.per_class().size
    detail = f"{len(local)} position-local layer uses take one per class ({per_class})"
    if not rest and not capture.fallback:
        return per_class, detail
    names = sorted({capture.name_of[id(r.weight)] for r in rest} | set(capture.fallback))
    return per_class + scores.size, (
        f"{detail}; {len(names)} parameters before a position-mixing operation "
        f"(e.g. {names[:3]}) one per (position, class) ({scores.size})"
    )


def _batched(
    out: Tensor,
    records: list[Record],
    scores: Scores,
    accs: list[Accumulator],
    rows: int,
    stat: torch.dtype,
    layout: tuple[int, int, int] | None = None,
    tick: Callable[[int], None] | None = None,
) -> None:
    """Many cotangents (exact kind, several MC samples) in chunks of batched backwards.

    ``tick(k)`` is told after each chunk of ``k`` passes (the cost notice's clock).

    ``autograd.grad(..., is_grads_batched=True)`` runs one vmapped backward per chunk of
    ``k`` cotangents; records then carry ``(k·rows, …)`` output gradients (cotangent
    major) and accumulators consume them with :meth:`Accumulator.add_many`. Falls back
    to one backward per cotangent if the graph cannot be vmapped. With a ``layout``
    ``(rows, T, outputs)`` (position-local records and per-class scores) each (row,
    position) is fed as its own row (:func:`~fisherflow.estimation.positions.as_rows`).
    """
    positions = 1 if layout is None else layout[1]
    shown = records if positions == 1 else [as_rows(r, positions) for r in records]
    fed_rows = rows * positions
    outs = [r.output for r in records]
    k_max = chunk_scores(records, scores.size)
    chunk: list[Tensor] = []

    def feed(grads: Any, k: int, many: bool = True) -> None:
        """Feed ``k`` scores' output gradients (``(k·rows, …)``, ``None``: unused)."""
        pairs = []
        for r, f, g in zip(records, shown, grads, strict=True):
            if g is None:
                shape = (k * r.output.shape[0], *r.output.shape[1:])
                g = torch.zeros(shape, dtype=r.output.dtype, device=r.output.device)
            d = r.handler.delta(r, g.to(stat))
            pairs.append((f, d if positions == 1 else delta_rows(d, positions)))
        for acc in accs:
            if many:
                acc.add_many(pairs, k, fed_rows)
            else:
                acc.add(pairs, {}, fed_rows)

    def flush() -> None:
        k = len(chunk)
        cot = torch.stack(chunk).to(out.dtype)
        chunk.clear()
        if k == 1:  # one cotangent: a plain backward, without vmap's overhead
            feed(torch.autograd.grad(out, outs, cot[0], retain_graph=True, allow_unused=True), 1)
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                grads = torch.autograd.grad(
                    out, outs, cot, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
        except RuntimeError:  # pragma: no cover - an op without a batching rule
            for c in cot:
                g1 = torch.autograd.grad(out, outs, c, retain_graph=True, allow_unused=True)
                feed(g1, 1, False)
            return
        feed([None if g is None else g.reshape(k * g.shape[1], *g.shape[2:]) for g in grads], k)

    for c in scores:
        chunk.append(c)
        if len(chunk) == k_max:
            flush()
            if tick is not None:
                tick(k_max)
    if chunk:
        k = len(chunk)
        flush()
        if tick is not None:
            tick(k)
