"""The diagonal structure: one variance-like entry per parameter."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from fisherflow.matrices.base import FisherMatrix
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import spectral_pinv, spectral_power
from fisherflow.matrices.validate import check_vector

__all__ = ["Diagonal"]


class Diagonal(FisherMatrix):
    """A diagonal Fisher matrix ``diag(d)``.

    Costs: every operation O(P) time and memory; exact ``+``.

    Args:
        values: The ``(P,)`` diagonal, entries >= 0.
        layout: Parameter layout with ``layout.size == P``.
        **meta: ``num_samples``, ``kind``, ``likelihood``.

    Example:
        >>> F = Diagonal(torch.tensor([4.0, 1.0]), ParamLayout.from_shapes({"t": (2,)}))
        >>> F.power(-0.5, damping=0.0).diagonal().tolist()
        [0.5, 1.0]
    """

    structure = "diagonal"

    def __init__(self, values: Tensor, layout: ParamLayout, **meta: Any) -> None:
        super().__init__(layout, **meta)
        self.values = check_vector(values, layout.size, "values")

    @override
    def _reference_tensor(self) -> Tensor:
        return self.values

    def _matmat(self, v: Tensor) -> Tensor:
        return self.values[:, None] * v

    def _diagonal(self) -> Tensor:
        return self.values.clone()

    def _eigvals(self) -> Tensor:
        return self.values

    def _power_matmat(self, v: Tensor, p: float, damping: float) -> Tensor:
        return spectral_power(self.values, p, damping)[:, None] * v

    @override
    def _pinv_matmat(self, v: Tensor, damping: float, rcond: float | None) -> Tensor:
        return spectral_pinv(self.values, damping, rcond)[:, None] * v

    def _power(self, p: float, damping: float) -> Diagonal:
        return Diagonal(spectral_power(self.values, p, damping), self.layout, **self.meta)

    @override
    def to_dense(self) -> Tensor:
        return torch.diag(self.values)

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
