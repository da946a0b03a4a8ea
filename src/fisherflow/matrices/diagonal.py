"""The diagonal structure: one variance-like entry per parameter."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from fisherflow.matrices.base import FisherMatrix
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import spectral_power

__all__ = ["Diagonal", "check_vector"]


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


class Diagonal(FisherMatrix):
    """A diagonal Fisher matrix ``diag(d)``.

    Costs: every operation O(P) time and memory; exact ``+``.

    Args:
        values: The ``(P,)`` diagonal, entries >= 0.
        layout: Parameter layout with ``layout.size == P``.
        **meta: ``num_samples``, ``kind``, ``likelihood``.

    Example:
        >>> F = Diagonal(torch.tensor([4.0, 1.0]), ParamLayout.from_shapes({"t": (2,)}))
        >>> F.power(-0.5).diagonal().tolist()
        [0.5, 1.0]
    """

    structure = "diagonal"

    def __init__(self, values: Tensor, layout: ParamLayout, **meta: Any) -> None:
        super().__init__(layout, **meta)
        self.values = check_vector(values, layout.size, "values")

    @property
    @override
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    @override
    def device(self) -> torch.device:
        return self.values.device

    def _matmat(self, v: Tensor) -> Tensor:
        return self.values[:, None] * v

    def _diagonal(self) -> Tensor:
        return self.values.clone()

    def _eigvals(self) -> Tensor:
        return self.values

    def _power_matmat(self, v: Tensor, p: float, damping: float) -> Tensor:
        return spectral_power(self.values, p, damping)[:, None] * v

    def _power(self, p: float, damping: float) -> Diagonal:
        return Diagonal(spectral_power(self.values, p, damping), self.layout, **self.meta)

    @override
    def to_dense(self) -> Tensor:
        return torch.diag(self.values)

    def _add(self, other: FisherMatrix) -> Diagonal:
        assert isinstance(other, Diagonal)
        return Diagonal(self.values + other.values, self.layout, **self.meta)

    def _scale(self, factor: float) -> Diagonal:
        meta = {**self.meta, "num_samples": self.num_samples * factor}
        return Diagonal(self.values * factor, self.layout, **meta)

    def _restrict(self, names: list[str]) -> Diagonal:
        idx = self.layout.indices(names).to(self.device)
        return Diagonal(self.values[idx], self.layout.subset(names), **self.meta)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"values": self.values}, {}

    @classmethod
    def _from_state(
        cls, layout: ParamLayout, tensors: dict[str, Tensor], extra: dict[str, Any], **meta: Any
    ) -> Diagonal:
        return cls(tensors["values"], layout, **meta)
