"""Summing Fisher matrices across ``torch.distributed`` ranks.

Built on the collectives of :mod:`fisherflow.distributed` (layer 0); the structure of
each rank's matrix is resolved through :data:`fisherflow.matrices.STRUCTURES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fisherflow.distributed import all_gather, all_gather_columns, require_distributed
from fisherflow.matrices.registry import STRUCTURES

if TYPE_CHECKING:  # annotations only: the base class imports this module
    from fisherflow.matrices.base import FisherMatrix

__all__ = ["all_reduce"]


def _gather_signatures(signature: str, group: Any) -> list[str]:
    """Every rank's signature string, in rank order."""
    data = torch.tensor(list(signature.encode()), dtype=torch.int64)[None, :]
    widths = all_gather(torch.tensor([data.shape[1]]), group)
    columns = all_gather_columns(data, group)[0]
    out, start = [], 0
    for width in widths:
        stop = start + int(width.item())
        out.append(bytes(columns[start:stop].tolist()).decode())
        start = stop
    return out


def all_reduce(fisher: FisherMatrix, group: Any = None) -> FisherMatrix:
    """Sum a Fisher matrix across ranks; every rank gets the same result.

    Every rank's tensors are gathered (they must have equal shapes: same structure
    and layout) and the per-rank matrices are added with ``+`` in rank order, so the
    result is exactly what ``F_0 + F_1 + ...`` gives in one process (exact for
    dense, diagonal and block; K-FAC, EKFAC and low-rank follow their documented
    addition).

    Args:
        fisher: This rank's matrix.
        group: The process group (default: the world).

    Returns:
        The sum over ranks, on every rank.

    Raises:
        RuntimeError: If no process group is initialised.
        ValueError: If ranks disagree on structure, layout or tensor shapes.
    """
    require_distributed("all_reduce")
    tensors, extra = fisher._state()
    signature = repr(
        (fisher.structure, fisher.layout.to_json(), {k: tuple(v.shape) for k, v in tensors.items()})
    )
    signatures = _gather_signatures(signature, group)
    if any(s != signature for s in signatures):
        raise ValueError(f"ranks hold different Fisher structures or layouts: {signatures}")
    gathered = {key: all_gather(value, group) for key, value in tensors.items()}
    counts = all_gather(torch.tensor([fisher.num_samples], dtype=torch.float64), group)
    cls = STRUCTURES[fisher.structure]
    total: FisherMatrix | None = None
    for rank, count in enumerate(counts):
        part = cls._from_state(
            fisher.layout,
            {key: pieces[rank] for key, pieces in gathered.items()},
            extra,
            num_samples=float(count.item()),
            kind=fisher.kind,
            likelihood=fisher.likelihood,
        )
        total = part if total is None else total + part
    if total is None:  # pragma: no cover - a process group has at least one rank
        raise RuntimeError("all_reduce found no ranks")
    return total
