"""What a Fisher structure implements: the abstract core and the defaults derived from it.

:class:`FisherCore` is the part of :class:`~fisherflow.matrices.FisherMatrix` a
structure author writes against: the metadata every matrix carries (layout,
``num_samples``, kind, likelihood), the **3 abstract members** — ``_matmat``
(``F @ V``), ``_state`` and ``_from_state`` — and a correct default for every other
private operation, derived from the core through the dense matrix (O(P²) memory,
O(P³) time: fine for small layouts). A structure overrides the defaults it can do
better (``_diagonal``, ``_eigvals``, ``_power_matmat``, ``_pinv_matmat``, ``_rank``,
``_power``, ``_add``, ``_scale``, ``_restrict``, ``_inv_sqrt_matmat``, ``to_dense``,
``groups``, and ``_reference_tensor``, the stored tensor ``dtype`` and ``device``
are read from). The public operations built on these live in
:mod:`fisherflow.matrices.base`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import default_rcond, eigh, spectral_pinv, spectral_power
from fisherflow.matrices.registry import STRUCTURES
from fisherflow.matrices.validate import check_meta

if TYPE_CHECKING:  # annotations only: base imports this module
    from fisherflow.matrices.base import FisherMatrix

__all__ = ["FisherCore"]


#: Columns per product when a default builds the dense matrix or its diagonal.
_CHUNK = 256


class FisherCore(abc.ABC):
    """The metadata, abstract core and overridable defaults of a Fisher matrix.

    Not used on its own: every structure subclasses
    :class:`~fisherflow.matrices.FisherMatrix`, which documents the constructor
    arguments and adds the public operations.

    Raises:
        TypeError: If ``layout`` is not a :class:`ParamLayout`.
        ValueError: If ``num_samples`` is negative or not finite, or ``kind`` is unknown.

    Example:
        The defaults agree with a structure's own overrides (here on ``diag(2, 8)``):

        >>> from fisherflow.matrices import Dense
        >>> matrix = torch.tensor([[2.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
        >>> F = Dense(matrix, ParamLayout.from_shapes({"w": (2,)}))
        >>> FisherCore._diagonal(F).tolist(), FisherCore._rank(F, None)
        ([2.0, 8.0], 2)
        >>> FisherCore._power(F, -1.0, 0.0).to_dense().diagonal().tolist()  # 1/2, 1/8
        [0.5, 0.125]
    """

    #: The structure name used in files and by ``fisherflow.estimation``.
    structure: ClassVar[str]

    layout: ParamLayout
    num_samples: float
    kind: str | None
    likelihood: str | None

    def __init__(
        self,
        layout: ParamLayout,
        *,
        num_samples: float = 0.0,
        kind: str | None = None,
        likelihood: str | None = None,
    ) -> None:
        self.layout = layout
        self.num_samples = check_meta(layout, num_samples, kind, likelihood)
        self.kind = kind
        self.likelihood = likelihood

    # ------------------------------------------------- abstract core (3 members)
    @abc.abstractmethod
    def _matmat(self, v: Tensor) -> Tensor:
        """``F @ v`` for a flat ``(P, k)`` matrix ``v``."""

    @abc.abstractmethod
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON-ready extras that :meth:`_from_state` rebuilds F from."""

    @classmethod
    @abc.abstractmethod
    def _from_state(
        cls, layout: ParamLayout, tensors: dict[str, Tensor], extra: dict[str, Any], **meta: Any
    ) -> FisherMatrix:
        """Rebuild a matrix from :meth:`_state` output (validating shapes)."""

    # ------------------------------------------------ defaults (override to be fast)
    def _reference_tensor(self) -> Tensor:
        """A stored tensor whose dtype and device are F's (default: the first state tensor)."""
        return next(iter(self._state()[0].values()))

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the stored statistics (of :meth:`_reference_tensor`)."""
        return self._reference_tensor().dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored statistics (of :meth:`_reference_tensor`)."""
        return self._reference_tensor().device

    def _identity_columns(self, start: int, stop: int) -> Tensor:
        cols = torch.zeros(self.size, stop - start, dtype=self.dtype, device=self.device)
        cols[start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
        return cols

    def _diagonal(self) -> Tensor:
        """The ``(P,)`` diagonal of F (default: ``_matmat`` on identity columns, chunked)."""
        parts = []
        for start in range(0, self.size, _CHUNK):
            stop = min(start + _CHUNK, self.size)
            block = self._matmat(self._identity_columns(start, stop))
            parts.append(block[start:stop].diagonal())
        if not parts:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(parts)

    def _dense_eigh(self) -> tuple[Tensor, Tensor]:
        """Cached eigendecomposition of the dense matrix (the defaults' fallback)."""
        cached = self.__dict__.get("_dense_eig")
        if cached is None:
            cached = eigh(self.to_dense())
            self.__dict__["_dense_eig"] = cached
        return cached

    def _eigvals(self) -> Tensor:
        """All P eigenvalues of F, any order (default: ``eigh`` of the dense matrix)."""
        return self._dense_eigh()[0]

    def _power_matmat(self, v: Tensor, p: float, damping: float) -> Tensor:
        """``(F + damping I)^p @ v`` for a flat ``(P, k)`` ``v`` (default: dense ``eigh``)."""
        vals, vecs = self._dense_eigh()
        return vecs @ (spectral_power(vals, p, damping)[:, None] * (vecs.T @ v))

    def _pinv_matmat(self, v: Tensor, damping: float, rcond: float | None) -> Tensor:
        """``(F + damping I)⁺ @ v`` with a relative cut-off (default: dense ``eigh``)."""
        vals, vecs = self._dense_eigh()
        return vecs @ (spectral_pinv(vals, damping, rcond)[:, None] * (vecs.T @ v))

    def _rank(self, rcond: float | None) -> int:
        """Numerical rank (default: eigenvalues above ``rcond`` times the largest)."""
        vals = self._eigvals().clamp_min(0)
        top = float(vals.max()) if vals.numel() else 0.0
        if top <= 0:
            return 0
        return int((vals > default_rcond(rcond, self.size, self.dtype) * top).sum())

    def _power(self, p: float, damping: float) -> FisherMatrix:
        """``(F + damping I)^p`` as a Fisher structure (default: a dense matrix)."""
        vals, vecs = self._dense_eigh()
        mat = (vecs * spectral_power(vals, p, damping)) @ vecs.T
        dense = {"matrix": 0.5 * (mat + mat.T)}
        return STRUCTURES["dense"]._from_state(self.layout, dense, {}, **self.meta)

    def _add(self, other: FisherMatrix) -> FisherMatrix:
        """Sum with a matrix of the same structure and layout (metadata already merged).

        Default: add the state tensors, which is exact for structures whose stored
        tensors are linear in F (dense, diagonal, block).
        """
        mine, extra = self._state()
        theirs, other_extra = other._state()
        if other_extra != extra or set(theirs) != set(mine):
            raise ValueError(
                f"cannot add {self.structure!r} Fishers of different shapes: "
                f"{extra} vs {other_extra}"
            )
        summed = {k: mine[k] + theirs[k] for k in mine}
        return type(self)._from_state(self.layout, summed, extra, **self.meta)

    def _scale(self, factor: float) -> FisherMatrix:
        """``factor * F`` with ``num_samples`` scaled too (default: scale the state tensors)."""
        tensors, extra = self._state()
        meta = {**self.meta, "num_samples": self.num_samples * factor}
        scaled = {k: t * factor for k, t in tensors.items()}
        return type(self)._from_state(self.layout, scaled, extra, **meta)

    def _restrict(self, names: list[str]) -> FisherMatrix:
        """The diagonal block of F over ``names`` (default: a dense sub-matrix)."""
        idx = self.layout.indices(names).to(self.device)
        cols = torch.zeros(self.size, idx.numel(), dtype=self.dtype, device=self.device)
        cols[idx, torch.arange(idx.numel(), device=self.device)] = 1.0
        sub = self._matmat(cols)[idx]
        dense = {"matrix": 0.5 * (sub + sub.T)}
        return STRUCTURES["dense"]._from_state(self.layout.subset(names), dense, {}, **self.meta)

    def groups(self) -> dict[str, list[str]]:
        """Named groups of parameters the structure models jointly (e.g. a layer)."""
        return {}

    def _inv_sqrt_matmat(self, z: Tensor, damping: float) -> Tensor:
        """``B z`` for some ``B`` with ``B Bᵀ = (F + damping I)^-1`` (sampling)."""
        return self._power_matmat(z, -0.5, damping)

    def to_dense(self) -> Tensor:
        """The ``(P, P)`` matrix (O(P²) memory: for small layouts and tests)."""
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return self._matmat(eye)

    # ------------------------------------------------------------- metadata
    @property
    def size(self) -> int:
        """Number of parameters P."""
        return self.layout.size

    @property
    def meta(self) -> dict[str, Any]:
        """Keyword metadata (num_samples, kind, likelihood) for building a sibling."""
        return {"num_samples": self.num_samples, "kind": self.kind, "likelihood": self.likelihood}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.size}, params={len(self.layout)}, "
            f"num_samples={self.num_samples:g}, kind={self.kind!r}, "
            f"likelihood={self.likelihood!r}, dtype={self.dtype})"
        )
