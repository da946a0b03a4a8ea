"""Parameters of a model read against a Fisher's layout, with clear errors.

Every use in :mod:`fisherflow.apps` takes a model as an ``nn.Module``, a state dict
(name → tensor) or, where a single vector is meant, a flat tensor in layout order;
these helpers turn any of them into the layout's flat vector or a name → tensor
dict and say precisely what does not match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.matrices import FisherMatrix, ParamLayout

__all__ = ["check_alike", "check_same_layout", "flat_params", "named_tensors"]


def named_tensors(source: Any, name: str) -> dict[str, Tensor]:
    """A module's parameters and buffers (its state dict) or a dict of tensors, by name.

    Raises:
        TypeError: If ``source`` is neither an ``nn.Module`` nor a mapping of tensors.
    """
    if isinstance(source, nn.Module):
        named: dict[str, Tensor] = dict(source.named_parameters(remove_duplicate=False))
        for key, value in source.state_dict(keep_vars=True).items():
            named.setdefault(key, value)
        return named
    if isinstance(source, Mapping):
        for key, value in source.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        return dict(source)
    raise TypeError(
        f"{name} must be an nn.Module or a dict name -> tensor, got {type(source).__name__}"
    )


def flat_params(source: Any, layout: ParamLayout, name: str) -> Tensor:
    """The parameters named by ``layout`` as one flat vector in layout order.

    Differentiable: for a module, the result is built from its live parameters.

    Args:
        source: An ``nn.Module``, a dict name → tensor (extra keys are ignored) or a
            flat ``(P,)`` tensor in layout order.
        layout: The layout to read.
        name: The argument's name, for error messages.

    Returns:
        A flat ``(P,)`` tensor.

    Raises:
        TypeError: If ``source`` has the wrong type.
        ValueError: If a parameter is missing, has another shape, or the flat tensor
            has the wrong length or NaN/Inf.
    """
    if isinstance(source, Tensor):
        if source.dim() != 1 or source.numel() != layout.size:
            raise ValueError(
                f"{name} as a flat tensor must have shape ({layout.size},) (the Fisher's "
                f"layout size), got {tuple(source.shape)}"
            )
        flat = source
    else:
        named = named_tensors(source, name)
        missing = [n for n in layout.names if n not in named]
        if missing:
            raise ValueError(
                f"{name} lacks parameters of the Fisher's layout: {missing[:5]}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                + f"; it has {list(named)[:5]}{' ...' if len(named) > 5 else ''}"
            )
        parts = []
        for pname, shape in zip(layout.names, layout.shapes, strict=True):
            t = named[pname]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{name}[{pname!r}] has shape {tuple(t.shape)} but the Fisher's layout "
                    f"says {shape}"
                )
            parts.append(t.reshape(-1))
        flat = torch.cat(parts) if parts else torch.zeros(0)
    if not flat.dtype.is_floating_point:
        raise TypeError(f"{name} must hold floating-point parameters, got {flat.dtype}")
    if not bool(torch.isfinite(flat.detach()).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return flat


def check_same_layout(fishers: list[FisherMatrix], name: str = "fishers") -> None:
    """Check that Fisher matrices share one structure, layout and group partition.

    Raises:
        TypeError: If an entry is not a :class:`FisherMatrix`.
        ValueError: If structures, layouts or groups differ (the message names the
            first difference).
    """
    for i, F in enumerate(fishers):
        if not isinstance(F, FisherMatrix):
            raise TypeError(f"{name}[{i}] must be a FisherMatrix, got {type(F).__name__}")
    check_alike(fishers, name)


def check_alike(fishers: Sequence[Any], name: str = "fishers") -> None:
    """Check that Fishers share one structure, layout and group partition.

    Duck-typed: anything with ``structure``, ``layout`` and ``groups()`` (such as the
    merge command's file readers) is compared the same way.

    Raises:
        ValueError: If structures, layouts or groups differ (the message names the
            first difference).
    """
    first = fishers[0]
    for i, F in enumerate(fishers[1:], start=1):
        if F.structure != first.structure:
            raise ValueError(
                f"{name} must share one structure: {name}[0] is {first.structure!r}, "
                f"{name}[{i}] is {F.structure!r}"
            )
        if F.layout != first.layout:
            diff = _first_difference(first.layout, F.layout)
            raise ValueError(f"{name}[{i}]'s layout differs from {name}[0]'s: {diff}")
        if F.groups() != first.groups():
            raise ValueError(f"{name}[{i}] groups its parameters differently from {name}[0]")


def _first_difference(a: ParamLayout, b: ParamLayout) -> str:
    if set(a.names) != set(b.names):
        only_a = [n for n in a.names if n not in b][:3]
        only_b = [n for n in b.names if n not in a][:3]
        return f"parameters only in the first: {only_a}, only in the other: {only_b}"
    for n in a.names:
        if a.shape(n) != b.shape(n):
            return f"{n!r} has shape {a.shape(n)} vs {b.shape(n)}"
    return "the parameters come in another order"
