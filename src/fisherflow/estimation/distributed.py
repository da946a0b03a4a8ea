"""All-reducing estimation sums across ``torch.distributed`` ranks.

Each rank streams over its own shard; the accumulators hold sums, so adding them
across ranks gives exactly the single-process sums on the union of the shards (for
``"exact"`` and ``"empirical"``; ``"mc"`` draws different labels per rank). K-FAC
factors are reduced as raw sums *before* normalisation, so they too equal the
single-process factors. Low-rank sketches are gathered and re-truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from fisherflow.estimation.accumulate import Accumulator, DiagonalAcc, KFACAcc, LowRankAcc

__all__ = ["reduce_accumulators", "want_distributed"]


def want_distributed(distributed: bool) -> bool:
    """Whether to all-reduce: requested and a process group is initialised.

    Raises:
        TypeError: If ``distributed`` is not a bool.
    """
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
    return distributed and dist.is_available() and dist.is_initialized()


def _sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    out = t.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def reduce_accumulators(accs: Sequence[Accumulator], count: int, group: Any = None) -> int:
    """Sum every accumulator's state (in place) and ``count`` across ranks.

    Returns:
        The total observation count.
    """
    for acc in accs:
        if isinstance(acc, DiagonalAcc):  # one collective; zeros where a rank saw nothing
            acc.set_vector(_sum(acc.vector(), group))
            continue
        for k in list(acc.state):
            acc.state[k] = _sum(acc.state[k], group)
        if isinstance(acc, KFACAcc):
            _reduce_kfac(acc, group)
        if isinstance(acc, LowRankAcc):
            B = acc.factor()
            world = dist.get_world_size(group)
            widths = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
            dist.all_gather(widths, torch.tensor([B.shape[1]]), group=group)
            width = int(max(w.item() for w in widths))
            padded = torch.zeros(B.shape[0], width, dtype=B.dtype, device=B.device)
            padded[:, : B.shape[1]] = B
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=group)
            acc.cols, acc.width = [torch.cat(parts, 1)], width * world
    total = torch.tensor([float(count)], dtype=torch.float64)
    return int(_sum(total, group).item())


def _reduce_kfac(acc: KFACAcc, group: Any) -> None:
    acc.rest.set_vector(_sum(acc.rest.vector(), group))
    for g in acc.plan.kron:
        n_out, n_cols = acc.plan.kron[g].dims(acc.plan.layout)
        # a rank that never saw a layer holds no entry: contribute zeros.
        a = acc.A.get(g)
        if a is None:
            emb = acc.plan.kron[g].input_major and _is_diag(acc, g)
            a = acc.plan.zeros(n_cols) if emb else acc.plan.zeros(n_cols, n_cols)
        acc.A[g] = _sum(a, group)
        acc.G[g] = _sum(acc.G.get(g, acc.plan.zeros(n_out, n_out)), group)
        c = torch.tensor([float(acc.counts.get(g, 0))], dtype=torch.float64)
        acc.counts[g] = float(_sum(c, group).item())


def _is_diag(acc: KFACAcc, g: str) -> bool:
    return any(a.dim() == 1 for a in acc.A.values()) and g not in acc.A
