"""Input validators of :mod:`fisherflow.matrices`: the one place each rule is written.

Every structure checks its tensors here, so a rule (finite, PSD diagonal, shapes,
damping >= 0, a relative cut-off in [0, 1)) reads the same wherever it applies.
Each validator raises ``TypeError`` or ``ValueError`` naming the argument, the rule
and the value received.
"""

from __future__ import annotations

import cmath
import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fisherflow.matrices.layout import ParamLayout

__all__ = [
    "KINDS",
    "all_finite",
    "check_columns",
    "check_damping",
    "check_factor",
    "check_matrix",
    "check_meta",
    "check_nonnegative",
    "check_partition",
    "check_power",
    "check_rcond",
    "check_real",
    "check_vector",
]

#: Kinds of Fisher estimate (see DESIGN.md): always named, never implied. ``None``
#: marks information that did not come from a model and data (a prior, a test matrix).
KINDS = ("exact", "mc", "empirical")


def check_meta(layout: object, num_samples: object, kind: object, likelihood: object) -> float:
    """Validate a Fisher matrix's layout and metadata; return ``num_samples`` as a float.

    Raises:
        TypeError: If ``layout`` is not a :class:`ParamLayout`, ``num_samples`` is not a
            real number or ``likelihood`` is neither a string nor ``None``.
        ValueError: If ``num_samples`` is negative or not finite, or ``kind`` is unknown.
    """
    if not isinstance(layout, ParamLayout):
        raise TypeError(f"layout must be a ParamLayout, got {type(layout).__name__}")
    count = check_nonnegative(num_samples, "num_samples", tensor=False)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if likelihood is not None and not isinstance(likelihood, str):
        raise TypeError(f"likelihood must be a string or None, got {type(likelihood).__name__}")
    return count


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite, cheaply in the common case.

    A finite sum proves every entry finite (NaN and ±Inf propagate through a sum), so
    the elementwise scan runs only when a sum is not finite (a non-finite entry, or
    an overflow of large finite entries). One reduction per tensor and one host
    synchronisation for all of them, which matters for large Kronecker factors
    validated on every build and on GPUs, where each synchronisation stalls.

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    sums = [t.sum() for t in tensors if t.numel()]
    if not sums:
        return True
    # the sum of the sums, read as one Python number: fewer small ops than
    # ``isfinite(stack(sums)).all()`` (which matters for the many small factors of
    # small models); complex sums are read as complex numbers
    if len(sums) == 1:
        total = sums[0]
    else:
        dtypes = {s.dtype for s in sums}
        if len(dtypes) > 1:  # a common dtype (float32 and float64 factors, complex)
            dtype = functools.reduce(torch.promote_types, dtypes)
            sums = [s.to(dtype) for s in sums]
        total = torch.stack(sums).sum()
    if cmath.isfinite(total.item()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def check_nonnegative(
    value: object, name: str, *, strict: bool = False, tensor: bool = True
) -> float:
    """Validate a finite real number ``>= 0`` (``> 0`` if ``strict``); return it as a float.

    The one validator of damping, prior precisions, temperatures, penalty strengths
    and the like, so they all accept the same inputs and say the same things.

    Args:
        value: The value received.
        name: The argument's name (in the error).
        strict: Require ``> 0`` instead of ``>= 0``.
        tensor: Accept a one-element tensor (read as its value).

    Returns:
        ``float(value)``.

    Raises:
        TypeError: If ``value`` is not a real number (a bool is not one).
        ValueError: If it is NaN, infinite or below the bound.

    Example:
        >>> check_nonnegative(0, "strength"), check_nonnegative(torch.tensor(2.0), "T", strict=True)
        (0.0, 2.0)
    """
    if tensor and isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out) or (out <= 0 if strict else out < 0):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} 0, got {out}")
    return out


def check_damping(damping: object, name: str = "damping") -> float:
    """Validate a damping value: a finite real number >= 0 (a one-element tensor too).

    Raises:
        TypeError: If ``damping`` is not a real number.
        ValueError: If it is negative, NaN or infinite.

    Example:
        >>> check_damping(0.5)
        0.5
    """
    return check_nonnegative(damping, name)


def check_real(value: object, name: str) -> float:
    """Validate a finite real number (not a bool) and return it as a float.

    Args:
        value: The value received.
        name: The argument's name (in the error).

    Returns:
        ``float(value)``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is NaN or infinite.

    Example:
        >>> check_real(3, "p")
        3.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def check_power(p: object) -> float:
    """Validate an exponent: a finite real number.

    Raises:
        TypeError: If ``p`` is not a real number.
        ValueError: If it is NaN or infinite.
    """
    return check_real(p, "p")


def check_rcond(rcond: object) -> float | None:
    """Validate a relative eigenvalue cut-off: ``None`` (the default) or a real in [0, 1).

    Raises:
        TypeError: If ``rcond`` is neither ``None`` nor a real number.
        ValueError: If it is outside ``[0, 1)`` or not finite.
    """
    if rcond is None:
        return None
    if isinstance(rcond, bool) or not isinstance(rcond, numbers.Real):
        raise TypeError(f"rcond must be None or a real number, got {type(rcond).__name__}")
    value = float(rcond)
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"rcond must be in [0, 1), got {value}")
    return value


def check_matrix(matrix: Tensor, size: int, name: str) -> Tensor:
    """Validate a square finite floating matrix of side ``size``.

    Raises:
        TypeError: If ``matrix`` is not a floating tensor.
        ValueError: If its shape is not ``(size, size)`` or it has NaN/Inf entries.
    """
    if not isinstance(matrix, Tensor) or not matrix.is_floating_point():
        raise TypeError(f"{name} must be a floating-point Tensor, got {type(matrix).__name__}")
    if tuple(matrix.shape) != (size, size):
        raise ValueError(f"{name} must have shape ({size}, {size}), got {tuple(matrix.shape)}")
    if not all_finite(matrix):
        raise ValueError(f"{name} contains NaN or Inf")
    return matrix


def check_vector(values: Tensor, size: int, name: str, nonnegative: bool = True) -> Tensor:
    """Validate a finite floating ``(size,)`` tensor, optionally entrywise >= 0.

    Raises:
        TypeError: If ``values`` is not a floating tensor.
        ValueError: If the shape is wrong, an entry is NaN/Inf, or (when required) negative.
    """
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point Tensor, got {type(values).__name__}")
    if tuple(values.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(values.shape)}")
    if values.numel() == 0:
        return values
    # one reduction and one sync: NaN propagates to both ends, ±Inf shows at one end
    lo, hi = torch.stack(torch.aminmax(values)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf")
    if nonnegative and lo < 0:
        raise ValueError(f"{name} must be >= 0 (information is PSD), min is {lo}")
    return values


def check_partition(layout: ParamLayout, groups: Mapping[str, Sequence[str]]) -> None:
    """Check that ``groups`` partitions some of the layout's names (each at most once).

    Raises:
        ValueError: If a group is empty, a name is unknown or appears in two groups.
    """
    seen: dict[str, str] = {}
    for group, names in groups.items():
        if not names:
            raise ValueError(f"group {group!r} is empty")
        for n in names:
            if n not in layout:
                raise ValueError(f"group {group!r} names {n!r}, which is not in the layout")
            if n in seen:
                raise ValueError(f"parameter {n!r} is in both group {seen[n]!r} and {group!r}")
            seen[n] = group


def check_factor(factor: Tensor, size: int, name: str, finite: bool = True) -> Tensor:
    """Validate a Kronecker factor: finite, floating, ``(size, size)`` or diagonal ``(size,)``.

    With ``finite=False`` only the type and shape (the caller checks finiteness, e.g.
    of several factors at once with :func:`all_finite`).

    Raises:
        TypeError: If not a floating tensor.
        ValueError: If the shape is wrong or it has NaN/Inf entries.
    """
    if not isinstance(factor, Tensor) or not factor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point Tensor, got {type(factor).__name__}")
    if tuple(factor.shape) not in ((size, size), (size,)):
        raise ValueError(
            f"{name} must have shape ({size}, {size}) or ({size},) for a diagonal factor, "
            f"got {tuple(factor.shape)}"
        )
    if finite and not all_finite(factor):
        raise ValueError(f"{name} contains NaN or Inf")
    return factor


def check_columns(v: Any, layout: ParamLayout, name: str = "v") -> tuple[Tensor, bool, bool]:
    """Validate a parameter vector: a flat ``(P,)``/``(P, k)`` tensor or a dict by name.

    Returns:
        ``(flat, is_vector, is_dict)``: the flat tensor (``(P,)`` or ``(P, k)``), whether
        it was one column, and whether it came as a dict (to return the same form).

    Raises:
        TypeError: If ``v`` is neither a tensor nor a dict of tensors.
        ValueError: If its length is not P or it contains NaN/Inf.
    """
    as_dict = isinstance(v, Mapping)
    if as_dict:
        flat = layout.flatten(v)
    elif isinstance(v, Tensor):
        flat = v
    else:
        raise TypeError(f"{name} must be a Tensor or a dict of tensors, got {type(v).__name__}")
    if flat.dim() not in (1, 2) or flat.shape[0] != layout.size:
        raise ValueError(
            f"{name} must have length P={layout.size} (flat (P,) or (P, k)), "
            f"got shape {tuple(flat.shape)}"
        )
    if not all_finite(flat):
        raise ValueError(f"{name} contains NaN or Inf")
    return flat, flat.dim() == 1, as_dict
