"""Positions as observations: the exact kind at one backward per class where it can.

The exact kind's Fisher of a sequence row is ``Σ_t J_tᵀ Λ_t J_t``: each observation
position ``t`` is its own score. A layer whose output at position ``t`` reaches the
model output only at position ``t`` (*position-local*: nothing after it mixes
positions — every layer of an embedding → MLP → logits model, the layers after the
last attention of a transformer) gets the gradient of position ``t``'s score from
one backward per class ``j`` with the cotangent ``R[:, :, j]`` at **every** position:
its output gradient at position ``t`` is then that position's alone. Presented to
the accumulators with each (row, position) as its own row — per-row gradients
``δ_{n,t} a_{n,t}ᵀ``, never summed over positions before squaring — this is the
exact answer at ``C`` backward passes instead of ``T·C``.

:func:`local_weights` finds the position-local layers on the first batch of a shape
(cached per model, input shapes and positions, like the hook check): random
cotangents at the first, middle and last position alone; a layer is local when its
output gradient is exactly zero at every other position in each probe (autograd
gives exact zeros where no path exists; causal attention passes the first
position's probe but fails the last's). A parameter is local only when every record
using it is.

The accumulators that give the exact answer on positions as rows say so
(:attr:`~fisherflow.estimation.accumulate.Accumulator.rows_exact`: per-layer or whole
outer products of per-row gradients; a low-rank sketch would truncate at other
points). With only some layers local, accumulators whose sums are per layer
(:attr:`~fisherflow.estimation.accumulate.Accumulator.per_layer`) take the local layers
from the class passes and the others from the (position, class) passes; whole-matrix
structures keep the (position, class) passes for every layer.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from fisherflow.estimation.data import warn_user
from fisherflow.estimation.layers import Record

__all__ = [
    "LONG_PASSES",
    "LONG_SECONDS",
    "CostNotice",
    "CostTimer",
    "as_rows",
    "clear_locality_cache",
    "delta_rows",
    "local_weights",
    "probe_positions",
]


#: An estimate whose first batch needs more backward passes than this, and takes more
#: than :data:`LONG_SECONDS`, gets a one-time :class:`CostNotice` once its first
#: chunk of passes has run (an estimate of the batch's seconds, before the rest).
LONG_PASSES = 200
#: Seconds of a first batch past which a long exact run is announced (see
#: :data:`LONG_PASSES`).
LONG_SECONDS = 1.0

#: ``{capture: {key: local weight names}}``: a capture (one per model signature)
#: holds its model's layers, so the probe's outcome is cached with it.
_LOCAL: weakref.WeakKeyDictionary[object, dict[Hashable, frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)


class CostNotice(UserWarning):
    """A long exact-kind run: its backward passes per batch and estimated seconds."""


def clear_locality_cache() -> None:
    """Forget every cached locality probe (the next exact estimate probes again)."""
    _LOCAL.clear()


def probe_positions(positions: int) -> list[int]:
    """The positions probed: first, middle and last (distinct)."""
    return sorted({0, positions // 2, positions - 1})


def _is_local(rec: Record, grad: Tensor | None, t: int, positions: int) -> bool:
    """Whether ``rec``'s output gradient for a probe at position ``t`` lies at ``t`` only."""
    if grad is None:
        return True
    d = rec.handler.delta(rec, grad)
    s = d.shape[1] if d.dim() >= 2 else 0
    if s % positions or rec.data.dim() < 2 or rec.data.shape[:2] != d.shape[:2]:
        return False
    blocks = d.reshape(d.shape[0], positions, s // positions, -1)
    off = torch.cat([blocks[:, :t], blocks[:, t + 1 :]], 1)
    return not bool(off.any())


def _close_over_parameters(
    records: Sequence[Record], local: list[bool], name_of: dict[int, str]
) -> frozenset[str]:
    """Weight names of the local records, after the closure over shared parameters.

    A record sharing a parameter with a non-local record is non-local too.
    """
    params = [{name_of[id(p)] for p in (r.weight, r.bias) if p is not None} for r in records]
    changed = True
    while changed:
        bad = set().union(*(p for p, ok in zip(params, local, strict=True) if not ok))
        changed = False
        for i, p in enumerate(params):
            if local[i] and p & bad:
                local[i], changed = False, True
    return frozenset(name_of[id(r.weight)] for r, ok in zip(records, local, strict=True) if ok)


def local_weights(
    out: Tensor,
    records: Sequence[Record],
    name_of: dict[int, str],
    shape: tuple[int, int, int],
    key: Hashable | None,
    owner: object,
) -> frozenset[str]:
    """Weight names of the position-local records (see the module docstring), cached.

    Args:
        out: The model output of the batch (its graph is retained).
        records: The batch's hooked records.
        name_of: ``{id(parameter): name}``.
        shape: ``(rows, positions, outputs)``: the output's layout as observations.
        key: What the outcome depends on besides ``owner`` (``None``: not cached).
        owner: What the cache is kept with, weakly (the capture of the model).

    Returns:
        The names of the weights all of whose records are position-local.
    """
    cache = _LOCAL.setdefault(owner, {}) if key is not None else {}
    if key is not None and key in cache:
        return cache[key]
    rows, positions, width = shape
    local = [True] * len(records)
    gen = torch.Generator(device=out.device)
    gen.manual_seed(2024)
    outs = [r.output for r in records]
    for t in probe_positions(positions):
        cot = torch.zeros(rows, positions, width, dtype=out.dtype, device=out.device)
        cot[:, t] = torch.randn(rows, width, generator=gen, dtype=out.dtype, device=out.device)
        grads = torch.autograd.grad(
            out, outs, cot.reshape(out.shape), retain_graph=True, allow_unused=True
        )
        for i, (r, g) in enumerate(zip(records, grads, strict=True)):
            local[i] = local[i] and _is_local(r, g, t, positions)
    found = _close_over_parameters(records, local, name_of)
    if key is not None:
        if len(cache) > 8:
            cache.clear()
        cache[key] = found
    return found


def as_rows(rec: Record, positions: int) -> Record:
    """The record with each (row, position) as a row: data ``(B·T, S/T, …)``."""
    data = rec.data
    flat = data.reshape(data.shape[0] * positions, data.shape[1] // positions, *data.shape[2:])
    return replace(rec, data=flat)


def delta_rows(d: Tensor, positions: int) -> Tensor:
    """An output gradient ``(B, S, …)`` as ``(B·T, S/T, …)`` (rows of :func:`as_rows`)."""
    return d.reshape(d.shape[0] * positions, d.shape[1] // positions, *d.shape[2:])


class CostTimer:
    """Times the first batch of an exact estimate and announces a long run once.

    The announcement comes as soon as the first chunk of passes has run (its time,
    scaled to every pass the batch needs, estimates the batch), so a user sees the cost
    before waiting for it; :meth:`done` announces what the batch took if no chunk did.

    Args:
        passes: Backward passes the batch needs.
        detail: What paid which price (layers by the passes they needed).
        announce: Whether to announce at all (the first batch of an estimate).
        device: The device the passes run on (CUDA is synchronised for the timing).
    """

    def __init__(self, passes: int, detail: str, announce: bool, device: torch.device) -> None:
        self.passes, self.detail, self.device = passes, detail, device
        self.pending = announce and passes > LONG_PASSES
        self.start = time.perf_counter() if self.pending else 0.0
        self.ran = 0

    def _seconds(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start

    def tick(self, passes: int) -> None:
        """``passes`` more backward passes have run: announce the estimated batch time.

        The first call that leaves passes to run estimates the batch as the seconds so
        far × all passes ÷ passes run, and announces it (once) if that exceeds
        :data:`LONG_SECONDS`.
        """
        if not self.pending:
            return
        self.ran += passes
        if self.ran >= self.passes:
            return  # nothing left to announce ahead of; done() reports the batch
        self.pending = False
        seconds = self._seconds() * self.passes / max(self.ran, 1)
        if seconds > LONG_SECONDS:
            warn_user(
                f"fisherflow.estimation: kind='exact' needs {self.passes} backward passes on "
                f"the first batch (about {seconds:.1f} s from its first {self.ran}; each "
                f"batch of its shape costs about as much): {self.detail}",
                CostNotice,
            )

    def done(self) -> None:
        """The batch's passes are done: announce them and their seconds if long (once)."""
        if not self.pending:
            return
        self.pending = False
        seconds = self._seconds()
        if seconds <= LONG_SECONDS:
            return
        warn_user(
            f"fisherflow.estimation: kind='exact' ran {self.passes} backward passes on the "
            f"first batch ({seconds:.1f} s; each batch of its shape costs about as much): "
            f"{self.detail}",
            CostNotice,
        )
