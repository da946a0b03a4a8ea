"""Per-sample gradients with ``torch.func`` (the fallback for layers without hooks)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from fisherflow.estimation.reference import Wrapped

__all__ = ["per_row_grads"]


def _in_dims(inputs: Any) -> Any:
    return tree_map(lambda v: 0 if isinstance(v, Tensor) else None, inputs)


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
        inputs: The batch inputs (tensors with rows in dimension 0, possibly nested).
        cotangents: ``(K, *output_shape)`` cotangents of the batch output.
        rows: Number of rows.
        max_elements: Rows are processed in chunks of at most this many gradient
            entries (``K · rows · P``) to bound memory.

    Returns:
        ``{name: (K, rows, *shape)}`` per-row gradients.

    Raises:
        RuntimeError: If ``torch.func`` cannot transform the model (the message names
            the original error); pass ``forward=`` or use hook-supported layers.
    """
    sub = {n: params[n].detach() for n in names}
    size = sum(p.numel() for p in sub.values())
    k = cotangents.shape[0]
    chunk = max(1, min(rows, max_elements // max(1, k * size)))

    def one_row(x: Any, cot: Tensor) -> dict[str, Tensor]:
        x1 = tree_map(lambda v: v.unsqueeze(0) if isinstance(v, Tensor) else v, x)

        def f(p: dict[str, Tensor]) -> Tensor:
            return wrapped.call(p, x1)

        _, pull = vjp(f, sub)  # type: ignore[misc]
        (g,) = vmap(pull)(cot.unsqueeze(1))  # type: ignore[misc]
        return g  # type: ignore[no-any-return]

    parts: list[dict[str, Tensor]] = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        xs = _slice(inputs, start, stop)
        cots = cotangents[:, start:stop].transpose(0, 1)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", UserWarning)
                parts.append(vmap(one_row, in_dims=(_in_dims(xs), 0))(xs, cots))
        except Exception as err:  # pragma: no cover - depends on the model
            raise RuntimeError(
                f"per-sample gradients via torch.func failed for parameters {list(names)[:5]}: "
                f"{type(err).__name__}: {err}"
            ) from err
    return {n: torch.cat([p[n] for p in parts], 0).transpose(0, 1) for n in names}


def _slice(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {k: _slice(v, start, stop) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_slice(v, start, stop) for v in inputs)
    return inputs
