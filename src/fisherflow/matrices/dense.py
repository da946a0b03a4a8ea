"""The dense structure: the full P×P matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from fisherflow.matrices.base import FisherMatrix
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import all_finite, eigh, equilibrated_solve, spectral_power

__all__ = ["Dense", "check_matrix"]


def check_matrix(matrix: Tensor, size: int, name: str) -> Tensor:
    """Validate a square symmetric-shaped finite floating matrix of side ``size``.

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


class Dense(FisherMatrix):
    """The full P×P Fisher matrix.

    Costs: ``mv`` O(P²); ``solve``/``inverse`` an equilibrated Cholesky (O(P³), accurate
    for badly scaled parameters); ``power``/``logdet``/``eigvalsh``/``sample`` one
    ``eigh`` of P×P (O(P³), cached) then O(P²) per vector; memory P².

    Args:
        matrix: The ``(P, P)`` symmetric PSD matrix (summed information).
        layout: Parameter layout with ``layout.size == P``.
        **meta: ``num_samples``, ``kind``, ``likelihood`` (see :class:`FisherMatrix`).

    Example:
        >>> layout = ParamLayout.from_shapes({"theta": (2,)})
        >>> F = Dense(torch.tensor([[4.0, 0.0], [0.0, 16.0]]), layout)
        >>> F.solve(torch.tensor([4.0, 16.0]), damping=0.0).tolist()
        [1.0, 1.0]
    """

    structure = "dense"

    def __init__(self, matrix: Tensor, layout: ParamLayout, **meta: Any) -> None:
        super().__init__(layout, **meta)
        self.matrix = check_matrix(matrix, layout.size, "matrix")
        self._eig: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_fisher(cls, fisher: FisherMatrix) -> Dense:
        """Materialise any structure as a dense matrix (O(P²) memory)."""
        return cls(fisher.to_dense(), fisher.layout, **fisher.meta)

    @property
    @override
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    @override
    def device(self) -> torch.device:
        return self.matrix.device

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Cached ``(eigenvalues, eigenvectors)`` of the matrix."""
        if self._eig is None:
            self._eig = eigh(self.matrix)
        return self._eig

    def _matmat(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _diagonal(self) -> Tensor:
        return self.matrix.diagonal().clone()

    def _eigvals(self) -> Tensor:
        return self.eigh()[0]

    def _power_matmat(self, v: Tensor, p: float, damping: float) -> Tensor:
        if p == -1:
            return equilibrated_solve(self.matrix, v, damping)
        vals, vecs = self.eigh()
        return vecs @ (spectral_power(vals, p, damping)[:, None] * (vecs.T @ v))

    def _power(self, p: float, damping: float) -> Dense:
        if p == -1:
            eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
            inv = equilibrated_solve(self.matrix, eye, damping)
            return Dense(0.5 * (inv + inv.T), self.layout, **self.meta)
        vals, vecs = self.eigh()
        mat = (vecs * spectral_power(vals, p, damping)) @ vecs.T
        return Dense(0.5 * (mat + mat.T), self.layout, **self.meta)

    @override
    def to_dense(self) -> Tensor:
        return self.matrix.clone()

    def _add(self, other: FisherMatrix) -> Dense:
        assert isinstance(other, Dense)
        return Dense(self.matrix + other.matrix, self.layout, **self.meta)

    def _scale(self, factor: float) -> Dense:
        meta = {**self.meta, "num_samples": self.num_samples * factor}
        return Dense(self.matrix * factor, self.layout, **meta)

    def _restrict(self, names: list[str]) -> Dense:
        idx = self.layout.indices(names).to(self.device)
        return Dense(self.matrix[idx][:, idx], self.layout.subset(names), **self.meta)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"matrix": self.matrix}, {}

    @classmethod
    def _from_state(
        cls, layout: ParamLayout, tensors: dict[str, Tensor], extra: dict[str, Any], **meta: Any
    ) -> Dense:
        return cls(tensors["matrix"], layout, **meta)
