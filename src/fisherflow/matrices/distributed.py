"""Summing Fisher matrices across ``torch.distributed`` ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fisherflow.matrices.base import FisherMatrix

__all__ = ["all_reduce"]


def all_reduce(fisher: FisherMatrix, group: Any = None) -> FisherMatrix:
    """Sum a Fisher matrix across ranks; every rank gets the same result.

    Every rank's tensors are gathered (they must have equal shapes: same structure
    and layout) and the per-rank matrices are added with ``+`` in rank order, so the
    result is exactly what ``F_0 + F_1 + ...`` gives in one process (exact for
    dense, diagonal and block; K-FAC, EKFAC and low-rank follow their documented
    addition).

    Raises:
        RuntimeError: If no process group is initialised.
        ValueError: If ranks disagree on structure, layout or tensor shapes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
    from fisherflow.matrices.io import STRUCTURES

    world = dist.get_world_size(group)
    tensors, extra = fisher._state()
    signature = repr(
        (fisher.structure, fisher.layout.to_json(), {k: tuple(v.shape) for k, v in tensors.items()})
    )
    signatures: list[Any] = [None] * world
    dist.all_gather_object(signatures, signature, group=group)
    if any(s != signature for s in signatures):
        raise ValueError(f"ranks hold different Fisher structures or layouts: {signatures}")
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for key, value in tensors.items():
        pieces = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(pieces, value.contiguous(), group=group)
        for rank, piece in enumerate(pieces):
            gathered[rank][key] = piece
    counts = torch.tensor([fisher.num_samples], dtype=torch.float64)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts, group=group)
    cls = STRUCTURES[fisher.structure]
    total: FisherMatrix | None = None
    for rank in range(world):
        part: FisherMatrix = cls._from_state(
            fisher.layout,
            gathered[rank],
            extra,
            num_samples=float(all_counts[rank].item()),
            kind=fisher.kind,
            likelihood=fisher.likelihood,
        )
        total = part if total is None else total + part
    assert total is not None
    return total
