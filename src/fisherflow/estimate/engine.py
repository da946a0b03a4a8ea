"""One pass over the data: forward with capture, one backward per score, accumulate."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimate.accumulate import Accumulator, Plan
from fisherflow.estimate.capture import Capture
from fisherflow.estimate.data import (
    Forward,
    batch_rows,
    output_tensor,
    split_batch,
    to_device,
)
from fisherflow.estimate.likelihoods import Likelihood
from fisherflow.estimate.persample import per_row_grads
from fisherflow.estimate.reference import Wrapped
from fisherflow.estimate.scores import make_scores
from fisherflow.matrices import KronGroup, ParamLayout

__all__ = ["build_plan", "probe", "run_pass"]


def _roles(module: nn.Module) -> tuple[str, str | None]:
    if isinstance(module, nn.MultiheadAttention):
        return "in_proj_weight", "in_proj_bias"
    return "weight", "bias"


def build_plan(
    capture: Capture,
    layout: ParamLayout,
    dtype: torch.dtype,
    device: torch.device,
    reduce: bool = False,
) -> Plan:
    """Groups (one per owning module) and Kronecker layers of the captured parameters.

    A weight is a Kronecker layer when every use is by a layer of the same Kronecker
    kind and orientation, all sharing the same bias (or none); a weight tied across
    different kinds (e.g. an embedding and an output layer) keeps an exact diagonal.
    """
    groups: dict[str, list[str]] = {}
    for n in layout.names:
        groups.setdefault(capture.owner.get(n, n) or "model", []).append(n)
    kron: dict[str, KronGroup] = {}
    for mname, module in capture.model.named_modules():
        handler = capture.handlers.get(id(module))
        if handler is None or not handler.kron:
            continue
        wrole, brole = _roles(module)
        w = getattr(module, wrole, None)
        if w is None:
            continue
        wn = capture.name_of[id(w)]
        if wn not in capture.hooked or capture.owner.get(wn) != mname:
            continue
        b = getattr(module, brole, None) if brole else None
        bn = capture.name_of[id(b)] if isinstance(b, Tensor) else None
        users = capture.uses[wn]
        if any(
            h is None
            or not h.kron
            or h.input_major != handler.input_major
            or getattr(m, _roles(m)[1] or "", None) is not b
            for m, h in users
        ):
            continue
        if bn is not None and (
            bn not in capture.hooked
            or {id(m) for m, _ in capture.uses[bn]} != {id(m) for m, _ in users}
        ):
            continue
        kron[mname or "model"] = KronGroup(wn, bn, handler.input_major)
    return Plan(layout, capture.name_of, groups, kron, dtype, device, reduce)


def _verify(capture: Capture, out: Tensor, cot: Tensor, pairs: list[Any]) -> set[str]:
    """Names whose captured batch gradient disagrees with autograd's (missed uses)."""
    params = {
        n: p for p in capture.model.parameters() if (n := capture.name_of[id(p)]) in capture.hooked
    }
    grads = torch.autograd.grad(
        out, list(params.values()), cot, retain_graph=True, allow_unused=True
    )
    mine: dict[str, Tensor] = {}
    for rec, d in pairs:
        w, b = rec.handler.batch_grad(rec, d)
        for p, g in ((rec.weight, w), (rec.bias, b)):
            if p is None or g is None:
                continue
            n = capture.name_of[id(p)]
            full = mine.setdefault(n, torch.zeros(p.shape, dtype=g.dtype, device=g.device))
            if rec.rows is None:
                full += g
            elif rec.handler.input_major:
                full[:, rec.rows] += g
            else:
                full[rec.rows] += g
    bad = set()
    for (n, p), g in zip(params.items(), grads, strict=True):
        ref = torch.zeros_like(p) if g is None else g
        got = mine.get(n, torch.zeros(p.shape, dtype=ref.dtype, device=ref.device))
        scale = ref.abs().max().item() + got.abs().max().item() + 1e-30
        tol = 1e-5 if ref.dtype == torch.float64 else 2e-2
        if (got.to(ref.dtype) - ref).abs().max().item() > tol * scale:
            bad.add(n)
    return bad


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
) -> int:
    """Stream over ``data`` once, feeding every accumulator; returns the observation count."""
    wrapped = Wrapped(model, forward)
    named = dict(model.named_parameters())
    total = 0
    with capture:
        for item in data:
            batch = split_batch(item, shift_labels)
            inputs = to_device(batch.inputs, device)
            targets = None if batch.targets is None else batch.targets.to(device)
            rows = batch_rows(inputs)
            capture.start(rows)
            with torch.enable_grad():
                out = output_tensor(forward(model, inputs))
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
            cots = [c.to(out.dtype) for c in scores] if capture.fallback else None
            func_all: dict[str, Tensor] = {}
            if capture.fallback and cots:
                func_all = per_row_grads(
                    wrapped, capture.fallback, named, inputs, torch.stack(cots), rows
                )
            for k, cot in enumerate(cots if cots is not None else scores):
                cot = cot.to(out.dtype)
                outs = [r.output for r in records]
                grads = (
                    torch.autograd.grad(out, outs, cot, retain_graph=True, allow_unused=True)
                    if outs
                    else []
                )
                pairs = [
                    (
                        r,
                        r.handler.delta(
                            r, (g if g is not None else torch.zeros_like(r.output)).to(stat)
                        ),
                    )
                    for r, g in zip(records, grads, strict=True)
                ]
                func = {n: g[k].to(stat) for n, g in func_all.items()}
                for acc in accs:
                    acc.add(pairs, func, rows)
            if progress is not None:
                progress.update(1)
    return total


def probe(
    model: nn.Module,
    item: Any,
    capture: Capture,
    *,
    lik: Likelihood,
    forward: Forward,
    shift_labels: bool | None,
    device: torch.device,
    stat: torch.dtype,
) -> None:
    """Check the capture on one batch against autograd; demote parameters it misses.

    Catches parameters used outside their module (e.g. an embedding matrix reused
    with ``F.linear``), layers that never run their hooks, and layers whose inputs
    do not carry the batch in dimension 0. Uses one MC-labelled backward pass.
    """
    batch = split_batch(item, shift_labels)
    inputs = to_device(batch.inputs, device)
    rows = batch_rows(inputs)
    gen = torch.Generator(device=device)
    gen.manual_seed(12345)
    with capture:
        capture.start(rows)
        with torch.enable_grad():
            out = output_tensor(forward(model, inputs))
        if capture.failed:
            capture.demote(capture.failed, "inputs without the batch in dimension 0")
        records = [r for r in capture.records if capture.name_of[id(r.weight)] in capture.hooked]
        if not capture.hooked:
            return
        (cot,) = list(make_scores(lik, out, None, "mc", rows, 1, gen, stat))
        cot = cot.to(out.dtype)
        outs = [r.output for r in records]
        grads = torch.autograd.grad(out, outs, cot, retain_graph=True, allow_unused=True)
        pairs = [
            (r, r.handler.delta(r, (g if g is not None else torch.zeros_like(r.output)).to(stat)))
            for r, g in zip(records, grads, strict=True)
        ]
        bad = _verify(capture, out, cot, pairs)
        if bad:
            capture.demote(bad, "a use of its parameters is not seen by hooks")
