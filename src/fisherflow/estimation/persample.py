"""Per-sample gradients with ``torch.func`` (the fallback for layers without hooks).

Two ways, both exact: :func:`per_row_grads` vectorises over rows with ``vmap`` (fast);
:func:`per_row_grads_loop` runs one vector-Jacobian product per row and score in a
Python loop (slow, for models ``vmap`` cannot run, such as ``nn.GRU``/``nn.LSTM``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from fisherflow.estimation.data import is_batched, select_rows
from fisherflow.estimation.reference import Wrapped

__all__ = ["VMAP_UNSUPPORTED", "per_row_grads", "per_row_grads_loop"]

#: Module types whose kernels ``torch.func.vmap`` cannot batch over rows (recurrent
#: layers): their parameters go straight to :func:`per_row_grads_loop`.
VMAP_UNSUPPORTED: tuple[type[nn.Module], ...] = (nn.RNNBase,)


def per_row_grads(
    wrapped: Wrapped,
    names: Sequence[str],
    params: Mapping[str, Tensor],
    inputs: Any,
    cotangents: Tensor,
    rows: int,
    max_elements: int = 2**26,
) -> dict[str, Tensor]:
    """Per-row vector-Jacobian products ``J_nᵀ c_{k,n}`` for the parameters ``names``.

    Args:
        wrapped: The model as a :class:`~fisherflow.estimation.reference.Wrapped` module.
        names: Parameter names (of the model) to differentiate.
        params: ``{name: tensor}`` current values of those parameters.
        inputs: The batch inputs (possibly nested); tensors with ``rows`` in dimension 0
            are split over rows, the others (e.g. ``(1, T)`` position ids) are shared.
        cotangents: ``(K, *output_shape)`` cotangents of the batch output.
        rows: Number of rows.
        max_elements: Rows are processed in chunks of at most this many gradient
            entries (``K · rows · P``) to bound memory.

    Returns:
        ``{name: (K, rows, *shape)}`` per-row gradients.

    Raises:
        RuntimeError: If ``torch.func`` cannot vectorise the model (the message names
            the original error); :func:`per_row_grads_loop` can then be used.
    """
    sub = {n: params[n].detach() for n in names}
    size = sum(p.numel() for p in sub.values())
    k = cotangents.shape[0]
    chunk = max(1, min(rows, max_elements // max(1, k * size)))

    def one_row(x: Any, cot: Tensor, flags: tuple[bool, ...]) -> dict[str, Tensor]:
        leaves, spec = tree_flatten(x)
        x1 = tree_unflatten(
            [v.unsqueeze(0) if f else v for v, f in zip(leaves, flags, strict=True)], spec
        )

        def f(p: dict[str, Tensor]) -> Tensor:
            return wrapped.call(p, x1)

        _, pull = vjp(f, sub)  # type: ignore[misc]
        (g,) = vmap(pull)(cot.unsqueeze(1))  # type: ignore[misc]
        return g  # type: ignore[no-any-return]

    # which leaves carry the batch is decided on the whole batch: a shared tensor whose
    # dimension 0 happens to equal a chunk's row count stays shared
    dims, flags = _batch_dims(inputs, rows)
    parts: list[dict[str, Tensor]] = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        xs = select_rows(inputs, start, stop, rows)
        cots = cotangents[:, start:stop].transpose(0, 1)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", UserWarning)
                mapped = vmap(functools.partial(one_row, flags=flags), in_dims=(dims, 0))
                parts.append(mapped(xs, cots))
        except Exception as err:  # depends on the model
            raise RuntimeError(
                f"per-sample gradients via torch.func failed for parameters {list(names)[:5]}: "
                f"{type(err).__name__}: {err}"
            ) from err
    return {n: torch.cat([p[n] for p in parts], 0).transpose(0, 1) for n in names}


def _batch_dims(inputs: Any, rows: int) -> tuple[Any, tuple[bool, ...]]:
    """``vmap``'s ``in_dims`` and, per leaf, whether it carries the batch in dimension 0."""
    leaves, spec = tree_flatten(inputs)
    flags = tuple(is_batched(v, rows) for v in leaves)
    return tree_unflatten([0 if f else None for f in flags], spec), flags


def per_row_grads_loop(
    wrapped: Wrapped,
    names: Sequence[str],
    params: Mapping[str, Tensor],
    inputs: Any,
    cotangents: Tensor,
    rows: int,
) -> dict[str, Tensor]:
    """:func:`per_row_grads` by a loop over rows: one forward per row, one VJP per score.

    Exact for any model autograd can differentiate, but slow (``rows`` forwards and
    ``K · rows`` backwards per batch); the fallback when ``vmap`` fails.

    Args:
        wrapped: The model as a :class:`~fisherflow.estimation.reference.Wrapped` module.
        names: Parameter names (of the model) to differentiate.
        params: ``{name: tensor}`` current values of those parameters.
        inputs: The batch inputs (as for :func:`per_row_grads`).
        cotangents: ``(K, *output_shape)`` cotangents of the batch output.
        rows: Number of rows.

    Returns:
        ``{name: (K, rows, *shape)}`` per-row gradients.
    """
    sub = {n: params[n].detach() for n in names}
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for r in range(rows):
        x1 = select_rows(inputs, r, r + 1, rows)

        def f(p: dict[str, Tensor], x1: Any = x1) -> Tensor:
            return wrapped.call(p, x1)

        with torch.enable_grad():
            _, pull = vjp(f, sub)  # type: ignore[misc]
            per_k = [pull(c[r : r + 1])[0] for c in cotangents]
        for n in names:
            out[n].append(torch.stack([g[n] for g in per_k]))
    return {n: torch.stack(out[n], 1) for n in names}
