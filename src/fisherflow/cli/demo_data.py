"""The data every ``fisherflow demo`` section shares: scikit-learn's digits."""

from __future__ import annotations

from typing import Any

__all__ = ["digits"]


def digits(dtype: Any = None, *, images: bool = False) -> tuple[Any, Any]:
    """scikit-learn's 1797 digits as tensors, pixels scaled to [0, 1].

    Args:
        dtype: Floating dtype of the pixels (default ``torch.float64``).
        images: ``(N, 1, 8, 8)`` images instead of ``(N, 64)`` rows.

    Returns:
        ``(x, y)``: the pixels and the integer labels 0–9.

    Example:
        >>> x, y = digits()
        >>> tuple(x.shape), int(y.max()), float(x.max())
        ((1797, 64), 9, 1.0)
    """
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float64 if dtype is None else dtype)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return x, torch.tensor(d.target)
