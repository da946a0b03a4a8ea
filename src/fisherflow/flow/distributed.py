"""Fisher Flow over ``torch.distributed``: all-reduce information, fuse per-rank estimates.

Each rank streams its shard into its own :class:`~fisherflow.flow.FisherFlow` (or
:class:`~fisherflow.flow.OnlineGLM`); the per-rank ``(θ_r, I_r)`` are independent, so
their information-weighted fusion is the pooled answer. Sums are formed in rank
order, so every rank gets exactly what :func:`fisherflow.flow.fuse` returns in one
process on the list of per-rank estimates. For GLMs, ``OnlineGLM.refine(data,
group=...)`` all-reduces the score and information per pass and reproduces the
single-process full-batch fit. The same code runs with one process (world size 1).
"""

from __future__ import annotations

from typing import Any, cast

import torch

from fisherflow.distributed import all_gather, is_distributed, require_distributed
from fisherflow.flow._common import check_flat
from fisherflow.flow._information import as_information
from fisherflow.flow.fusion import parse_estimates
from fisherflow.flow.state import Estimate, FisherFlow
from fisherflow.flow.weighting import information_weighted
from fisherflow.matrices import FisherMatrix, Vector

__all__ = ["all_reduce_information", "fuse_across_ranks", "is_distributed"]


def all_reduce_information(information: FisherMatrix, group: Any = None) -> FisherMatrix:
    """Sum information across ranks (rank order); every rank gets the same matrix.

    Any structure of :data:`fisherflow.matrices.STRUCTURES`; the sum is the
    structure's own ``+`` (exact for dense, diagonal, block, and EKFAC in a shared
    basis; factor-wise for K-FAC; truncated for low-rank).

    Raises:
        TypeError: If ``information`` is not a FisherMatrix.
        RuntimeError: If no process group is initialised.
    """
    if not isinstance(information, FisherMatrix):
        raise TypeError(f"information must be a FisherMatrix, got {type(information).__name__}")
    return information.all_reduce(group)


def fuse_across_ranks(
    estimate: FisherFlow | Estimate | tuple[Vector, FisherMatrix], group: Any = None
) -> Estimate:
    """Information-weighted fusion of one estimate per rank; the result on every rank.

    Equals ``fisherflow.flow.fuse([estimate_rank0, estimate_rank1, ...])`` in one
    process (same operations in the same order), for every structure.

    Args:
        estimate: This rank's estimate: a FisherFlow, an Estimate or ``(params, info)``.
        group: Process group (default: the world).

    Returns:
        The fused :class:`Estimate` (params in this rank's form).

    Raises:
        RuntimeError: If no process group is initialised.
        ValueError: If ranks disagree on layout or structure.
    """
    require_distributed("fuse_across_ranks")
    thetas, infos, layout, form, structure = parse_estimates([estimate])
    theta, info = thetas[0], infos[0]
    total = info.all_reduce(group)
    parts = all_gather(cast(torch.Tensor, info.mv(theta)), group)
    h_sum = parts[0]
    for part in parts[1:]:
        h_sum = h_sum + part
    total = as_information(total, layout, structure, "information", theta.dtype)
    fused = information_weighted(total, check_flat(h_sum, layout, "h", theta.dtype))
    return Estimate(form(fused), total)
