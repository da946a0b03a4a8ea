"""Kronecker-factored layer groups: the matrix view of a layer's parameters.

A layer with weight ``W`` and optional bias ``b`` is viewed as one matrix
``X`` of shape ``(n_out, n_in + has_bias)``: ``W`` reshaped to ``(n_out, n_in)``
(transposed first when the weight is stored input-major, as in Hugging Face
``Conv1D`` and ``nn.Embedding``) with ``b`` appended as the last column. The
layer's Fisher block is ``G ⊗ A`` acting as ``X ↦ G X A``: ``A`` is the input-side
factor (``n_in + has_bias`` square, last row/column for the bias's constant
input), ``G`` the output-side factor. A factor may be stored as a 1-D tensor,
meaning a diagonal matrix (e.g. the one-hot input factor of an embedding).

For an output-major weight without bias, the block in the layout's row-major
vectorisation is exactly ``kron(G, A)``; input-major, ``kron(A, G)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import eigh

__all__ = ["KronGroup", "factor_diag", "factor_eigh", "left", "right"]


@dataclass(frozen=True)
class KronGroup:
    """Which parameters a Kronecker-factored group covers, and how they are stored.

    Args:
        weight: Name of the weight parameter (at least 1-D).
        bias: Name of the bias parameter (shape ``(n_out,)``) or ``None``.
        input_major: ``True`` when the weight is stored ``(n_in, n_out)``
            (Hugging Face ``Conv1D``, ``nn.Embedding``), ``False`` for ``(n_out, ...)``
            (``nn.Linear``, ``nn.Conv*d``).
    """

    weight: str
    bias: str | None = None
    input_major: bool = False

    @property
    def names(self) -> list[str]:
        """Parameter names of the group, weight first."""
        return [self.weight] + ([self.bias] if self.bias else [])

    def dims(self, layout: ParamLayout) -> tuple[int, int]:
        """``(n_out, n_in + has_bias)``: the sides of ``G`` and ``A``.

        Raises:
            ValueError: If the shapes are inconsistent with the group description.
        """
        shape = layout.shape(self.weight)
        if len(shape) == 0:
            raise ValueError(f"weight {self.weight!r} of a Kronecker group must be at least 1-D")
        if self.input_major:
            if len(shape) != 2:
                raise ValueError(
                    f"input-major weight {self.weight!r} must be 2-D (n_in, n_out), got {shape}"
                )
            n_in, n_out = shape
        else:
            n_out, n_in = shape[0], math.prod(shape[1:])
        if self.bias is not None and layout.shape(self.bias) != (n_out,):
            raise ValueError(
                f"bias {self.bias!r} must have shape ({n_out},), got {layout.shape(self.bias)}"
            )
        return n_out, n_in + (self.bias is not None)

    def to_json(self) -> list[Any]:
        """JSON-ready ``[weight, bias, input_major]``."""
        return [self.weight, self.bias, self.input_major]

    @classmethod
    def from_json(cls, data: Any) -> KronGroup:
        """Inverse of :meth:`to_json`."""
        weight, bias, input_major = data
        return cls(str(weight), None if bias is None else str(bias), bool(input_major))

    def gather(self, layout: ParamLayout, v: Tensor) -> Tensor:
        """Flat ``(P, k)`` columns → ``(k, n_out, n_in + has_bias)`` matrix views."""
        n_out, n_cols = self.dims(layout)
        k = v.shape[1]
        w = v[layout.slice(self.weight)].T  # (k, numel)
        if self.input_major:
            w = w.reshape(k, n_cols - (self.bias is not None), n_out).transpose(1, 2)
        else:
            w = w.reshape(k, n_out, -1)
        if self.bias is None:
            return w
        b = v[layout.slice(self.bias)].T.reshape(k, n_out, 1)
        return torch.cat([w, b], dim=2)

    def scatter(self, layout: ParamLayout, x: Tensor, out: Tensor) -> None:
        """Write ``(k, n_out, n_cols)`` matrix views back into flat ``(P, k)`` ``out``."""
        k = x.shape[0]
        w = x[:, :, :-1] if self.bias is not None else x
        if self.input_major:
            w = w.transpose(1, 2)
        _copy_columns(out[layout.slice(self.weight)], w.reshape(k, -1).T)
        if self.bias is not None:
            _copy_columns(out[layout.slice(self.bias)], x[:, :, -1].T)


def _copy_columns(dst: Tensor, src: Tensor) -> None:
    """``dst[...] = src`` for ``(n, k)`` views; one column is copied as a vector.

    torch 2.13's CPU copy into an ``(n, 1)`` slice from a transposed ``(n, 1)`` view
    does not vectorise (30× slower than the same copy between the 1-D columns; it was
    most of a K-FAC ``solve``'s time beyond its matrix products).
    """
    if dst.shape[1] == 1:
        dst[:, 0] = src[:, 0]
    else:
        dst.copy_(src)


def left(factor: Tensor | None, x: Tensor) -> Tensor:
    """``F @ x`` on the row side of ``(k, m, n)`` views; ``None`` is the identity."""
    if factor is None:
        return x
    if factor.dim() == 1:
        return factor[:, None] * x
    return factor @ x


def right(x: Tensor, factor: Tensor | None) -> Tensor:
    """``x @ F`` on the column side of ``(k, m, n)`` views; ``None`` is the identity."""
    if factor is None:
        return x
    if factor.dim() == 1:
        return x * factor
    return x @ factor


def factor_diag(factor: Tensor) -> Tensor:
    """The diagonal of a 2-D or diagonal (1-D) factor."""
    return factor if factor.dim() == 1 else factor.diagonal()


def factor_eigh(factor: Tensor) -> tuple[Tensor, Tensor | None]:
    """Eigendecomposition of a factor; a diagonal (1-D) factor has the identity basis."""
    if factor.dim() == 1:
        return factor, None
    return eigh(factor)
