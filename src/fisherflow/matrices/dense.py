"""The dense structure: the full P×P matrix."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import override

from fisherflow.matrices.base import FisherMatrix
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import (
    default_rcond,
    eigh,
    equilibrated_eigh,
    equilibrated_pinv_solve,
    power_matmat,
    power_matrix,
)
from fisherflow.matrices.validate import check_matrix

__all__ = ["Dense", "scaled_rank"]


def scaled_rank(decomposition: tuple[Tensor, Tensor, Tensor], rcond: float) -> int:
    """Rank from :func:`~fisherflow.matrices.linalg.equilibrated_eigh`: the scaled spectrum.

    Example:
        >>> scaled_rank(equilibrated_eigh(torch.tensor([[4.0, 0.0], [0.0, 0.0]]), 0.0), 1e-6)
        1
    """
    vals = decomposition[1].clamp_min(0)
    top = float(vals.max()) if vals.numel() else 0.0
    return int((vals > rcond * top).sum()) if top > 0 else 0


class Dense(FisherMatrix):
    """The full P×P Fisher matrix.

    Costs: ``mv`` O(P²); ``solve``/``inverse`` an equilibrated Cholesky (O(P³), accurate
    for badly scaled parameters); ``power``/``logdet``/``eigvalsh``/``sample`` one
    ``eigh`` of P×P (O(P³), cached) then O(P²) per vector; ``pinv_solve``/``rank`` one
    ``eigh`` of the Jacobi-scaled matrix (cached without damping); memory P².

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
        self._scaled: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_fisher(cls, fisher: FisherMatrix) -> Dense:
        """Materialise any structure as a dense matrix (O(P²) memory)."""
        return cls(fisher.to_dense(), fisher.layout, **fisher.meta)

    @override
    def _reference_tensor(self) -> Tensor:
        return self.matrix

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Cached ``(eigenvalues, eigenvectors)`` of the matrix."""
        if self._eig is None:
            self._eig = eigh(self.matrix)
        return self._eig

    def scaled_eigh(self, damping: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """``(s, λ, Q)`` of the Jacobi-scaled ``S (F + damping I) S`` (cached at damping 0)."""
        if damping != 0.0:
            return equilibrated_eigh(self.matrix, damping)
        if self._scaled is None:
            self._scaled = equilibrated_eigh(self.matrix, 0.0)
        return self._scaled

    def _matmat(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    @override
    def _pinv_matmat(self, v: Tensor, damping: float, rcond: float | None) -> Tensor:
        return equilibrated_pinv_solve(self.scaled_eigh(damping), v, rcond)

    @override
    def _rank(self, rcond: float | None) -> int:
        return scaled_rank(self.scaled_eigh(), default_rcond(rcond, self.size, self.dtype))

    def _diagonal(self) -> Tensor:
        return self.matrix.diagonal().clone()

    def _eigvals(self) -> Tensor:
        return self.eigh()[0]

    def _power_matmat(self, v: Tensor, p: float, damping: float) -> Tensor:
        return power_matmat(self.matrix, self.eigh, v, p, damping)

    def _power(self, p: float, damping: float) -> Dense:
        return Dense(power_matrix(self.matrix, self.eigh, p, damping), self.layout, **self.meta)

    @override
    def to_dense(self) -> Tensor:
        return self.matrix.clone()

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
