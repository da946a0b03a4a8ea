"""``torch.distributed`` collectives: the one home every fisherflow layer uses.

This module sits below every other layer (it imports only torch), so
:mod:`fisherflow.matrices`, :mod:`fisherflow.estimation` and :mod:`fisherflow.flow`
all reduce, gather and broadcast through the same few functions. Sums are formed
in rank order from gathered pieces where bit-identical results across ranks matter
(:func:`all_gather`), and with ``all_reduce`` where only the sum is needed
(:func:`all_reduce_sum`).

The user-level names of Fisher Flow over ranks, :func:`all_reduce_information` and
:func:`fuse_across_ranks`, live in :mod:`fisherflow.flow` and are re-exported here
on first access (a lazy import keeps this module at the bottom of the layers).

Example:
    >>> is_distributed()  # no process group in a plain Python session
    False
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather",
    "all_gather_columns",
    "all_reduce_sum",
    "broadcast",
    "is_distributed",
    "require_distributed",
    "world_size",
]

#: Names re-exported lazily from :mod:`fisherflow.flow` (a higher layer).
_FLOW_NAMES = ("all_reduce_information", "fuse_across_ranks")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def require_distributed(caller: str) -> None:
    """Raise unless a process group is initialised.

    Args:
        caller: The public name that needs the group (named in the error).

    Raises:
        RuntimeError: If no process group is initialised.
    """
    if not is_distributed():
        raise RuntimeError(f"{caller} needs an initialised torch.distributed process group")


def world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """The sum of ``tensor`` over ranks, as a new tensor (the input is untouched).

    Without a process group the sum over one rank is a copy of ``tensor``.

    Args:
        tensor: This rank's tensor (every rank passes the same shape and dtype).
        group: The process group (default: the world).

    Returns:
        The elementwise sum over ranks.
    """
    out = tensor.contiguous().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather(tensor: Tensor, group: Any = None) -> list[Tensor]:
    """Every rank's ``tensor``, in rank order (equal shapes on every rank).

    Args:
        tensor: This rank's tensor.
        group: The process group (default: the world).

    Returns:
        One tensor per rank; ``[tensor]`` without a process group.
    """
    if not is_distributed():
        return [tensor]
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def all_gather_columns(matrix: Tensor, group: Any = None) -> Tensor:
    """Every rank's columns side by side, in rank order (column counts may differ).

    Args:
        matrix: This rank's ``(n, k_rank)`` matrix (``n`` equal on every rank).
        group: The process group (default: the world).

    Returns:
        The ``(n, Σ k_rank)`` concatenation; ``matrix`` without a process group.
    """
    if not is_distributed():
        return matrix
    widths = all_gather(torch.tensor([matrix.shape[1]], device=matrix.device), group)
    width = int(max(int(w.item()) for w in widths))
    padded = matrix.new_zeros(matrix.shape[0], width)
    padded[:, : matrix.shape[1]] = matrix
    parts = all_gather(padded, group)
    return torch.cat([p[:, : int(w.item())] for p, w in zip(parts, widths, strict=True)], 1)


def broadcast(tensor: Tensor, src: int = 0, group: Any = None) -> Tensor:
    """Rank ``src``'s ``tensor`` on every rank, as a new tensor.

    Args:
        tensor: The tensor (its shape and dtype must agree on every rank).
        src: The rank whose values are sent.
        group: The process group (default: the world).

    Returns:
        A copy of ``src``'s tensor; a copy of ``tensor`` without a process group.
    """
    out = tensor.contiguous().clone()
    if is_distributed():
        dist.broadcast(out, src=src, group=group)
    return out


def __getattr__(name: str) -> Any:
    if name in _FLOW_NAMES:
        import fisherflow.flow as flow  # a higher layer, loaded on use

        return getattr(flow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
