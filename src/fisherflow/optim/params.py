"""Parameter groups of a model's optimizer from names, tensors or group dicts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

__all__ = ["param_groups"]


def param_groups(model: nn.Module, params: Iterable[Any] | None) -> list[dict[str, Any]]:
    """``torch.optim`` parameter groups over ``model``'s parameters.

    Args:
        model: The module the parameters belong to.
        params: ``None`` (every parameter with ``requires_grad``), parameter names,
            tensors, or group dicts whose ``"params"`` hold names or tensors.

    Returns:
        A list of group dicts whose ``"params"`` are tensors of ``model``.

    Raises:
        ValueError: If a name is not a parameter of ``model`` (the valid ones
            listed) or ``params`` selects nothing.
        TypeError: If an entry is neither a name, a tensor nor a dict.
    """
    named = dict(model.named_parameters())

    def resolve(entries: Any) -> list[Tensor]:
        entries = [entries] if isinstance(entries, (str, Tensor)) else list(entries)
        out: list[Tensor] = []
        for entry in entries:
            if isinstance(entry, str):
                if entry not in named:
                    raise ValueError(
                        f"params: {entry!r} is not a parameter of the model; "
                        f"valid names: {sorted(named)}"
                    )
                out.append(named[entry])
            elif isinstance(entry, Tensor):
                out.append(entry)
            else:
                raise TypeError(
                    f"params entries must be names, tensors or group dicts, got "
                    f"{type(entry).__name__}"
                )
        return out

    if params is None:
        groups: list[dict[str, Any]] = [{"params": [p for p in named.values() if p.requires_grad]}]
    else:
        entries = list(params)
        if entries and all(isinstance(e, dict) for e in entries):
            groups = [{**e, "params": resolve(e["params"])} for e in entries]
        else:
            groups = [{"params": resolve(entries)}]
    if not any(g["params"] for g in groups):
        raise ValueError("params selects no parameter to optimize")
    return groups
