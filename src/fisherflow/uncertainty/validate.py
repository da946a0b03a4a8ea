"""Validators of :mod:`fisherflow.uncertainty`'s arguments: positive scalars, prior precisions."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fisherflow.matrices.validate import check_nonnegative

__all__ = ["check_batch_size", "check_positive", "check_prior_precision"]


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0 (a 1-element tensor is accepted) as a float.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is NaN, infinite or <= 0.

    Example:
        >>> check_positive(2, "temperature")
        2.0
    """
    return check_nonnegative(value, name, strict=True)


def check_prior_precision(value: object) -> Tensor:
    """A prior precision as a float64 tensor: a scalar or one value per layer, finite, > 0.

    Raises:
        TypeError: If ``value`` is neither a real number nor a tensor/sequence of them.
        ValueError: If it has more than one dimension, or a value is NaN, infinite or <= 0.
    """
    if isinstance(value, bool):
        raise TypeError("prior_precision must be a real number or a 1-D tensor, got bool")
    if isinstance(value, numbers.Real):
        tau = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, (Tensor, list, tuple)):
        tau = torch.as_tensor(value).detach().to(torch.float64).cpu()
    else:
        raise TypeError(
            f"prior_precision must be a real number or a 1-D tensor, got {type(value).__name__}"
        )
    if tau.dim() > 1:
        raise ValueError(f"prior_precision must be a scalar or 1-D, got shape {tuple(tau.shape)}")
    if tau.dim() == 1 and tau.numel() == 1:
        tau = tau[0]
    if not bool(torch.isfinite(tau).all()) or bool((tau <= 0).any()):
        raise ValueError(f"prior_precision must be finite and > 0, got {tau.tolist()}")
    return tau


def check_batch_size(value: object, name: str = "batch_size") -> int | None:
    """``None`` or a positive integer (rows per chunk).

    Raises:
        ValueError: If ``value`` is neither.

    Example:
        >>> check_batch_size(64), check_batch_size(None)
        (64, None)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    return int(value)
