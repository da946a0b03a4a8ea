"""EKFAC: the K-FAC eigenbasis with corrected (per-coordinate) eigenvalues.

Reference: George et al. (2018), "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis". The eigenvalues ``S`` are the second moments of
the gradients expressed in the basis ``Q_G ⊗ Q_A``, which makes EKFAC the
Frobenius-closest matrix of the form ``(Q_G ⊗ Q_A) diag(s) (Q_G ⊗ Q_A)ᵀ``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from fisherflow.matrices.base import FisherMatrix
from fisherflow.matrices.dense import Dense
from fisherflow.matrices.kron import KronGroup, left, right
from fisherflow.matrices.kron_base import KronStructure
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import spectral_power
from fisherflow.matrices.validate import all_finite

__all__ = ["EKFAC"]


def _t(q: Tensor | None) -> Tensor | None:
    return None if q is None else q.T


def _sq(q: Tensor | None, n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device) if q is None else q * q


class EKFAC(KronStructure):
    """EKFAC: per layer ``(Q_G ⊗ Q_A) diag(S) (Q_G ⊗ Q_A)ᵀ``, diagonal for the rest.

    ``Q_A``/``Q_G`` are orthogonal (``None`` means the identity basis, e.g. for a
    diagonal factor) and ``S`` is an ``(n_out, n_in + has_bias)`` array of
    eigenvalues ``>= 0``.

    **Addition** is exact when both matrices share the basis (``Q_A``, ``Q_G`` equal:
    the eigenvalues add); otherwise the second is projected onto the first's basis
    (its diagonal there, the EKFAC correction in a fixed basis), which is exact for
    the part of it the basis can represent.

    ``pinv_solve`` and ``rank`` are exact: the eigenvalues ``S`` and ``rest`` are the
    whole spectrum, so the pseudo-inverse is elementwise in the basis.

    Costs: ``mv`` and every ``power`` O(n_out² n_cols + n_out n_cols²) per layer (two
    basis changes); ``power``/``inverse`` are elementwise on ``S`` and stay EKFAC; memory
    ``Σ n_out² + n_cols² + n_out n_cols``.

    Args:
        groups: ``{layer name: KronGroup}``.
        QA: ``{layer: input-side eigenbasis or None}``.
        QG: ``{layer: output-side eigenbasis or None}``.
        S: ``{layer: (n_out, n_cols) eigenvalues}``.
        layout: The parameter layout.
        rest: Diagonal information of parameters outside the layers, or ``None``.
        **meta: ``num_samples``, ``kind``, ``likelihood``.

    Example:
        >>> layout = ParamLayout.from_shapes({"w": (1, 2)})
        >>> F = EKFAC({"l": KronGroup("w")}, {"l": None}, {"l": None},
        ...           {"l": torch.tensor([[4.0, 9.0]])}, layout)
        >>> F.power(-0.5, damping=0.0).diagonal().tolist()
        [0.5, 0.3333333432674408]
    """

    structure = "ekfac"

    def __init__(
        self,
        groups: Mapping[str, KronGroup],
        QA: Mapping[str, Tensor | None],
        QG: Mapping[str, Tensor | None],
        S: Mapping[str, Tensor],
        layout: ParamLayout,
        rest: Tensor | None = None,
        **meta: Any,
    ) -> None:
        for name, d in (("QA", QA), ("QG", QG), ("S", S)):
            if set(d) != set(groups):
                raise ValueError(f"{name} must have one entry per group {sorted(groups)}")
        self.QA, self.QG, self.S = dict(QA), dict(QG), dict(S)
        super().__init__(groups, layout, rest, **meta)
        for g in groups:
            n_out, n_cols = self.dims[g]
            for name, q, n in (("QA", self.QA[g], n_cols), ("QG", self.QG[g], n_out)):
                if q is not None and tuple(q.shape) != (n, n):
                    raise ValueError(
                        f"{name}[{g!r}] must have shape ({n}, {n}), got {tuple(q.shape)}"
                    )
            s = self.S[g]
            if not isinstance(s, Tensor) or tuple(s.shape) != (n_out, n_cols):
                raise ValueError(f"S[{g!r}] must be a tensor of shape ({n_out}, {n_cols})")
        # every group in one synchronisation: finite sums and the smallest entry
        lows = [s.min().float() for s in self.S.values() if s.numel()]
        if lows and not (all_finite(*self.S.values()) and float(torch.stack(lows).min()) >= 0):
            for g, s in self.S.items():  # name the culprit
                if not all_finite(s) or bool((s < 0).any()):
                    raise ValueError(f"S[{g!r}] must be finite and >= 0")

    def _group_dtype(self) -> torch.dtype:
        return next(iter(self.S.values())).dtype if self.S else torch.get_default_dtype()

    def _group_device(self) -> torch.device:
        return next(iter(self.S.values())).device if self.S else torch.device("cpu")

    def _rotate_in(self, g: str, x: Tensor) -> Tensor:
        return right(left(_t(self.QG[g]), x), self.QA[g])

    def _rotate_out(self, g: str, x: Tensor) -> Tensor:
        return right(left(self.QG[g], x), _t(self.QA[g]))

    def _group_matmat(self, g: str, x: Tensor) -> Tensor:
        return self._rotate_out(g, self.S[g] * self._rotate_in(g, x))

    def _group_power_matmat(self, g: str, x: Tensor, p: float, damping: float) -> Tensor:
        return self._rotate_out(g, spectral_power(self.S[g], p, damping) * self._rotate_in(g, x))

    def _group_spectral_matmat(self, g: str, x: Tensor, fn: Any) -> Tensor:
        return self._rotate_out(g, fn(self.S[g]) * self._rotate_in(g, x))

    def _group_diagonal(self, g: str) -> Tensor:
        n_out, n_cols = self.dims[g]
        s = self.S[g]
        return _sq(self.QG[g], n_out, s) @ s @ _sq(self.QA[g], n_cols, s).T

    def _group_eigvals(self, g: str) -> Tensor:
        return self.S[g]

    def _with(self, S: dict[str, Tensor], rest: Tensor, **meta: Any) -> EKFAC:
        return EKFAC(self.kron_groups, self.QA, self.QG, S, self.layout, rest, **meta)

    def _power(self, p: float, damping: float) -> EKFAC:
        S = {g: spectral_power(s, p, damping) for g, s in self.S.items()}
        return self._with(S, spectral_power(self.rest, p, damping), **self.meta)

    def _project(self, other: EKFAC, g: str) -> Tensor:
        """``other``'s eigenvalues for group ``g`` expressed in this matrix's basis."""
        n_out, n_cols = self.dims[g]
        s = other.S[g]

        def overlap(mine: Tensor | None, theirs: Tensor | None, n: int) -> Tensor:
            if mine is None and theirs is None:
                return torch.eye(n, dtype=s.dtype, device=s.device)
            a = torch.eye(n, dtype=s.dtype, device=s.device) if mine is None else mine
            b = torch.eye(n, dtype=s.dtype, device=s.device) if theirs is None else theirs
            m = a.T @ b
            return m * m

        return (
            overlap(self.QG[g], other.QG[g], n_out) @ s @ overlap(self.QA[g], other.QA[g], n_cols).T
        )

    def _add(self, other: FisherMatrix) -> EKFAC:
        assert isinstance(other, EKFAC)
        if other.kron_groups != self.kron_groups:
            raise ValueError("cannot add EKFAC matrices with different layer groups")
        S = {g: self.S[g] + self._project(other, g) for g in self.kron_groups}
        return self._with(S, self.rest + other.rest, **self.meta)

    def _scale(self, factor: float) -> EKFAC:
        meta = {**self.meta, "num_samples": self.num_samples * factor}
        return self._with({g: s * factor for g, s in self.S.items()}, self.rest * factor, **meta)

    @override
    def _restrict_partial(self, group: str, name: str) -> Dense:
        # The sub-block is not of EKFAC form: materialise the layer's block
        # (n_out·n_cols square) and cut it.
        block = self._restrict(self.kron_groups[group].names)
        sub = block.layout.indices([name]).to(self.device)
        return Dense(block.to_dense()[sub][:, sub], self.layout.subset([name]), **self.meta)

    @override
    def _subset(
        self, groups: dict[str, KronGroup], layout: ParamLayout, rest: Tensor | None
    ) -> EKFAC:
        QA, QG = {g: self.QA[g] for g in groups}, {g: self.QG[g] for g in groups}
        S = {g: self.S[g] for g in groups}
        return EKFAC(groups, QA, QG, S, layout, rest, **self.meta)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {"rest": self.rest}
        identity = []
        for i, g in enumerate(self.kron_groups):
            tensors[f"S.{i}"] = self.S[g]
            qa, qg = self.QA[g], self.QG[g]
            if qa is not None:
                tensors[f"QA.{i}"] = qa
            if qg is not None:
                tensors[f"QG.{i}"] = qg
            identity.append([qa is None, qg is None])
        return tensors, {**self._extra(), "identity": identity}

    @classmethod
    def _from_state(
        cls, layout: ParamLayout, tensors: dict[str, Tensor], extra: dict[str, Any], **meta: Any
    ) -> EKFAC:
        groups = cls._groups_from(extra)
        identity = extra["identity"]
        QA: dict[str, Tensor | None] = {}
        QG: dict[str, Tensor | None] = {}
        S = {}
        for i, g in enumerate(groups):
            QA[g] = None if identity[i][0] else tensors[f"QA.{i}"]
            QG[g] = None if identity[i][1] else tensors[f"QG.{i}"]
            S[g] = tensors[f"S.{i}"]
        return cls(groups, QA, QG, S, layout, tensors["rest"], **meta)
