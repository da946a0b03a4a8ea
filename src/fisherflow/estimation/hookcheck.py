"""The hook check: hooks' gradients against autograd's on a pass's first batch.

A parameter used outside its layer (an embedding matrix reused with ``F.linear``), a
layer that never runs its hooks, or one whose inputs lack the batch in dimension 0
is found on the first batch and demoted to per-sample gradients; gradients that are
zero in theory and computed as rounding noise (attention key biases) are told apart
from a real mismatch (:func:`mismatched`). Outcomes are cached per model.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation.capture import Capture
from fisherflow.estimation.data import Forward, output_tensor, split_batch, to_device
from fisherflow.estimation.layers import record_deltas
from fisherflow.estimation.plan import input_signature, model_signature
from fisherflow.estimation.positions import clear_locality_cache

__all__ = [
    "CHECK_TOL",
    "SPREAD_TOL",
    "Check",
    "Recheck",
    "check_first_batch",
    "clear_probe_cache",
    "mismatched",
    "probe",
]

#: ``{model: {signature: (failed names, missed names, spread module ids)}}`` results
#: of :func:`probe`.
_Probed = tuple[frozenset[str], frozenset[str], tuple[tuple[int, tuple[int, bool]], ...]]
_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, _Probed]] = weakref.WeakKeyDictionary()


def clear_probe_cache() -> None:
    """Forget every cached hook check and locality probe (the next estimate re-checks)."""
    _PROBED.clear()
    clear_locality_cache()


def _signature(
    model: nn.Module,
    capture: Capture,
    inputs: Any,
    forward: Any,
    shift: Any,
    model_sig: Hashable | None = None,
) -> Hashable | None:
    """What a hook check depends on: modules, parameters, forward and input shapes."""
    sig_in = input_signature(inputs)
    if sig_in is None:
        return None
    return (
        model_signature(model) if model_sig is None else model_sig,
        tuple(sorted(capture.hooked)),
        id(forward),
        *sig_in,  # type: ignore[misc]
        shift,
        torch.is_grad_enabled(),
    )


def _verify(
    capture: Capture, pairs: list[Any], params: Mapping[str, Tensor], grads: Any
) -> set[str]:
    """Names whose captured batch gradient disagrees with autograd's ``grads`` (missed uses)."""
    mine: dict[str, Tensor] = {}
    for rec, d in pairs:
        w, b = rec.handler.batch_grad(rec, d)
        for p, g in ((rec.weight, w), (rec.bias, b)):
            if p is None or g is None:
                continue
            n = capture.name_of[id(p)]
            if rec.rows is None and n not in mine:
                mine[n] = g
                continue
            if n not in mine:
                mine[n] = torch.zeros(p.shape, dtype=g.dtype, device=g.device)
            if rec.rows is None:
                mine[n] = mine[n] + g
            elif rec.handler.input_major:
                mine[n][:, rec.rows] += g
            else:
                mine[n][rec.rows] += g
    pairs_ = list(zip(grads, [mine.get(n) for n in params], strict=True))
    return {n for n, bad in zip(params, mismatched(pairs_), strict=True) if bad}


#: ``(rtol, noise)`` of the hook check per dtype: a gradient mismatches when its error
#: exceeds ``rtol`` times its own size and ``noise`` times the largest gradient entry
#: of all the compared parameters.
CHECK_TOL = {
    torch.float64: (1e-5, 1e-11),
    torch.float32: (2e-2, 1e-5),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (2e-2, 1e-2),
}


#: ``(rtol, noise)`` of the check that expanding a batch-less embedding changes nothing.
SPREAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1e-2, 1e-3),
}


def mismatched(
    pairs: list[tuple[Tensor | None, Tensor | None]],
    tol: Mapping[torch.dtype, tuple[float, float]] = CHECK_TOL,
) -> list[bool]:
    """For each ``(ref, got)`` gradient pair, whether they differ beyond rounding noise.

    A pair mismatches when ``max |got − ref|`` exceeds both ``rtol · (max |ref| +
    max |got|)`` (its own scale) and ``noise · s``, ``s`` the largest entry over all
    pairs (``tol``, default :data:`CHECK_TOL`): a gradient that is exactly zero in
    theory (an attention key bias — softmax ignores a shift shared by all keys) but
    computed as rounding noise of order ``ε · s`` is no mismatch, while a missed use
    of a parameter still is unless its contribution is negligible against the whole
    model's gradient. A side that is ``None`` counts as zero; two ``None`` agree.
    """
    rows: list[Tensor] = []
    dtype = next((t.dtype for pair in pairs for t in pair if t is not None), torch.float64)
    device = next((t.device for pair in pairs for t in pair if t is not None), None)
    for ref, got in pairs:
        if ref is None and got is None:
            rows.append(torch.zeros(3, dtype=torch.float64, device=device))
            continue
        ref_ = ref if ref is not None else torch.zeros_like(got)  # type: ignore[arg-type]
        got_ = (got if got is not None else torch.zeros_like(ref_)).to(ref_.dtype)
        if not ref_.numel():
            rows.append(torch.zeros(3, dtype=torch.float64, device=device))
            continue
        parts = [(got_ - ref_).abs().max(), ref_.abs().max(), got_.abs().max()]
        rows.append(torch.stack(parts).to(torch.float64))
    if not rows:
        return []
    table = torch.stack(rows).tolist()  # one synchronisation
    rtol, noise = tol.get(dtype, tol[torch.float32])
    scale = max(max(r) for r in table)
    return [d > rtol * (r + g + 1e-30) and d > noise * scale for d, r, g in table]


class Recheck(Exception):
    """The first batch's hook check demoted parameters: rebuild the plan and start again."""


class Check:
    """A pending hook check, run by :func:`run_pass` on its first batch (a cache miss).

    Attributes:
        failed: Parameters whose layers saw inputs without the batch in dimension 0.
        missed: Parameters with a use the hooks do not see.
    """

    def __init__(self, sig: Hashable | None, cache: dict[Hashable, _Probed]) -> None:
        self.sig, self.cache = sig, cache
        self.failed: set[str] = set()
        self.missed: set[str] = set()

    def remember(self, capture: Capture) -> None:
        """Cache the outcome for later estimates with the same signature."""
        if self.sig is None:
            return
        if len(self.cache) > 8:
            self.cache.clear()
        spread = tuple(sorted(capture.spread.items()))
        entry = (frozenset(self.failed), frozenset(self.missed), spread)
        self.cache[self.sig] = entry

    def demote(self, capture: Capture) -> None:
        """Move the parameters found so far to per-sample gradients (with notices)."""
        capture.demote(self.failed, "inputs without the batch in dimension 0")
        capture.demote(self.missed, "a use of its parameters is not seen by hooks")


def probe(
    model: nn.Module,
    item: Any,
    capture: Capture,
    *,
    forward: Forward,
    shift_labels: bool | None,
    device: torch.device,
    model_sig: Hashable | None = None,
) -> Check | None:
    """Apply a cached hook check for this model and batch, or return a pending one.

    The check (see :func:`run_pass`) catches parameters used outside their module
    (e.g. an embedding matrix reused with ``F.linear``), layers that never run their
    hooks, and layers whose inputs do not carry the batch in dimension 0. Its outcome
    is cached per model (weakly), keyed by its modules, parameters, ``forward`` and
    the input shapes, so repeated estimates on the same model skip it
    (:func:`clear_probe_cache` forgets it).

    Returns:
        ``None`` when the cached outcome was applied, else the :class:`Check` for the
        first batch of :func:`run_pass`.
    """
    batch = split_batch(item, shift_labels)
    inputs = to_device(batch.inputs, device)
    try:
        sig = _signature(model, capture, inputs, forward, shift_labels, model_sig)
        cache = _PROBED.setdefault(model, {})
    except TypeError:  # pragma: no cover - model not weak-referenceable
        sig, cache = None, {}
    if sig is None or sig not in cache:
        return Check(sig, cache)
    failed, missed, spread = cache[sig]
    capture.spread = dict(spread)
    known = Check(sig, cache)
    known.failed, known.missed = set(failed), set(missed)
    known.demote(capture)
    return None


def check_first_batch(
    check: Check,
    model: nn.Module,
    inputs: Any,
    rows: int,
    capture: Capture,
    forward: Forward,
    out: Tensor,
    stat: torch.dtype,
) -> Tensor:
    """The hook check on a pass's first batch; returns the output to continue with.

    Expands batch-less embeddings when that changes neither the output nor the
    parameter gradients (:func:`_try_spread`), then compares the hooks' per-row
    gradients of the first and last rows with autograd's for a random cotangent on
    those rows (zero elsewhere). A parameter used outside its layer shows as a
    difference in its sum; a layer whose dimension 0 is not the batch (positions that
    happen to number as many as the rows) shows as rows that do not match. One extra
    backward, no extra forward (unless an embedding is expanded).

    Raises:
        Recheck: If parameters must be demoted (recorded in ``check``).
    """
    if capture.unbatched:
        out = _try_spread(model, inputs, rows, capture, forward, out)
    if capture.failed & capture.hooked:
        check.failed |= capture.failed & capture.hooked
        raise Recheck
    records = [r for r in capture.records if capture.name_of[id(r.weight)] in capture.hooked]
    if records:
        sel = [0] if rows == 1 else [0, rows - 1]
        params = _hooked_params(capture)
        outs = [r.output for r in records]
        grads = torch.autograd.grad(
            out,
            outs + list(params.values()),
            _row_cotangent(out, sel),
            retain_graph=True,
            allow_unused=True,
        )
        pairs = record_deltas(records, grads[: len(outs)], stat)
        if len(sel) < rows:  # the rows with a cotangent (two rows: cheap copies)
            pairs = [(replace(r, data=r.data[sel]), d[sel]) for r, d in pairs]
        bad = _verify(capture, pairs, params, grads[len(outs) :])
        if bad:
            check.missed |= bad
            raise Recheck
    check.remember(capture)
    return out


def _hooked_params(capture: Capture) -> dict[str, Tensor]:
    return {
        n: p for p in capture.model.parameters() if (n := capture.name_of[id(p)]) in capture.hooked
    }


def _row_cotangent(out: Tensor, sel: list[int]) -> Tensor:
    """A seeded standard normal cotangent on the rows ``sel`` of ``out``, zero elsewhere."""
    gen = torch.Generator(device=out.device)
    gen.manual_seed(12345)
    cot = torch.zeros_like(out)
    shape = (len(sel), *out.shape[1:])
    cot[sel] = torch.randn(shape, generator=gen, dtype=out.dtype, device=out.device)
    return cot


def _try_spread(
    model: nn.Module,
    inputs: Any,
    rows: int,
    capture: Capture,
    forward: Forward,
    out: Tensor,
) -> Tensor:
    """Expand batch-less embeddings over the batch if the model is unchanged by it.

    Unchanged means the same output and the same gradients of the hooked parameters
    for a random cotangent, on a batch of at least two rows (with one, an operation
    that depends on the batch size would go unseen). Returns the output of the forward
    pass whose records the capture now holds.
    """
    if rows < 2:
        return out
    sel = list(range(rows))
    params = list(_hooked_params(capture).values())
    capture.spread = dict(capture.unbatched)
    capture.start(rows)
    try:
        with torch.enable_grad():
            spread = output_tensor(forward(model, inputs))
        same = spread.shape == out.shape and _close(spread.detach(), out.detach())
        if same and params:
            cot = _row_cotangent(out, sel)
            g_ref = torch.autograd.grad(out, params, cot, retain_graph=True, allow_unused=True)
            g_new = torch.autograd.grad(spread, params, cot, retain_graph=True, allow_unused=True)
            same = all((a is None) == (b is None) for a, b in zip(g_ref, g_new, strict=True))
            same = same and not any(mismatched(list(zip(g_ref, g_new, strict=True)), SPREAD_TOL))
    except Exception:  # the expansion broke an assumption of the model (any error)
        same = False
    if same:
        return spread
    capture.spread = {}
    capture.start(rows)
    with torch.enable_grad():
        return output_tensor(forward(model, inputs))


def _close(new: Tensor, ref: Tensor) -> bool:
    tol = 1e-10 if ref.dtype == torch.float64 else 1e-4
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.allclose(new, ref, rtol=tol, atol=tol * scale))
