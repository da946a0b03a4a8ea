"""K-FAC: a Kronecker product ``G ⊗ A`` per layer, a diagonal for the rest.

Reference: Martens & Grosse (2015), "Optimizing Neural Networks with
Kronecker-factored Approximate Curvature"; Grosse & Martens (2016) for convolutions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from fisherflow.matrices.base import FisherMatrix
from fisherflow.matrices.ekfac import EKFAC
from fisherflow.matrices.kron import KronGroup, factor_diag, factor_eigh, left, right
from fisherflow.matrices.kron_base import KronStructure
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.validate import all_finite, check_factor

__all__ = ["KFAC"]


class KFAC(KronStructure):
    """K-FAC: per layer ``G ⊗ A``, diagonal for parameters outside the layers.

    **Scale convention.** ``A`` is the per-observation *mean* of the input second
    moment and ``G`` carries the *summed* output-gradient information, so
    ``G ⊗ A`` approximates the summed Fisher block. ``γ * F`` scales ``G``.

    **Addition is factor-wise** (an approximation): ``A`` becomes the mean of the two
    ``A``'s weighted by ``num_samples`` and ``G`` the sum of the ``G``'s. It is exact
    when the two ``A``'s are equal; otherwise it is the usual running-average update
    of K-FAC factors, not ``G₁⊗A₁ + G₂⊗A₂``.

    Costs: ``mv`` O(n_out² n_in + n_out n_in²) per layer; ``solve``/``power``/``logdet``
    /``eigvalsh``/``sample`` one ``eigh`` of each factor (cached), never a P×P matrix;
    ``power`` and ``inverse`` return an :class:`~fisherflow.matrices.EKFAC` in the
    factors' eigenbasis because ``(G ⊗ A + λI)^p`` is not a Kronecker product when
    ``λ > 0``. ``pinv_solve`` and ``rank`` are exact, in the same eigenbasis (the
    eigenvalues of ``G ⊗ A`` are the products of the factors' eigenvalues).

    Args:
        groups: ``{layer name: KronGroup}``.
        A: ``{layer name: input factor}``, ``(n_in + has_bias)`` square or 1-D diagonal.
        G: ``{layer name: output factor}``, ``n_out`` square or 1-D diagonal.
        layout: The parameter layout.
        rest: Diagonal information of parameters outside the layers, or ``None``.
        **meta: ``num_samples``, ``kind``, ``likelihood``.

    Example:
        >>> layout = ParamLayout.from_shapes({"w": (2, 2)})
        >>> F = KFAC({"l": KronGroup("w")}, {"l": torch.eye(2)}, {"l": 3 * torch.eye(2)},
        ...          layout)
        >>> torch.equal(F.to_dense(), torch.kron(3 * torch.eye(2), torch.eye(2)))
        True
    """

    structure = "kfac"

    def __init__(
        self,
        groups: Mapping[str, KronGroup],
        A: Mapping[str, Tensor],
        G: Mapping[str, Tensor],
        layout: ParamLayout,
        rest: Tensor | None = None,
        **meta: Any,
    ) -> None:
        if set(A) != set(groups) or set(G) != set(groups):
            raise ValueError(
                f"A and G must have one factor per group {sorted(groups)}, "
                f"got {sorted(A)} and {sorted(G)}"
            )
        self.A, self.G = dict(A), dict(G)
        super().__init__(groups, layout, rest, **meta)
        for g in groups:
            n_out, n_cols = self.dims[g]
            check_factor(self.A[g], n_cols, f"A[{g!r}]", finite=False)
            check_factor(self.G[g], n_out, f"G[{g!r}]", finite=False)
        if not all_finite(*self.A.values(), *self.G.values()):  # one synchronisation
            for g in groups:  # name the culprit
                check_factor(self.A[g], self.dims[g][1], f"A[{g!r}]")
                check_factor(self.G[g], self.dims[g][0], f"G[{g!r}]")
        self._basis: EKFAC | None = None

    def _group_dtype(self) -> torch.dtype:
        return next(iter(self.A.values())).dtype if self.A else torch.get_default_dtype()

    def _group_device(self) -> torch.device:
        return next(iter(self.A.values())).device if self.A else torch.device("cpu")

    def eigenbasis(self) -> EKFAC:
        """The same matrix as an EKFAC in the factors' eigenbasis (cached).

        Its eigenvalues per layer are the outer product of the factors' eigenvalues.
        """
        if self._basis is None:
            QA, QG, S = {}, {}, {}
            for g in self.kron_groups:
                ea, qa = factor_eigh(self.A[g])
                eg, qg = factor_eigh(self.G[g])
                QA[g], QG[g] = qa, qg
                S[g] = torch.outer(eg.clamp_min(0), ea.clamp_min(0))
            self._basis = EKFAC(self.kron_groups, QA, QG, S, self.layout, self.rest, **self.meta)
        return self._basis

    def _group_matmat(self, g: str, x: Tensor) -> Tensor:
        return right(left(self.G[g], x), self.A[g])

    def _group_diagonal(self, g: str) -> Tensor:
        return torch.outer(factor_diag(self.G[g]), factor_diag(self.A[g]))

    def _group_eigvals(self, g: str) -> Tensor:
        return self.eigenbasis()._group_eigvals(g)

    def _group_power_matmat(self, g: str, x: Tensor, p: float, damping: float) -> Tensor:
        return self.eigenbasis()._group_power_matmat(g, x, p, damping)

    def _group_spectral_matmat(self, g: str, x: Tensor, fn: Any) -> Tensor:
        return self.eigenbasis()._group_spectral_matmat(g, x, fn)

    def _power(self, p: float, damping: float) -> FisherMatrix:
        return self.eigenbasis()._power(p, damping)

    def _add(self, other: FisherMatrix) -> KFAC:
        assert isinstance(other, KFAC)
        if other.kron_groups != self.kron_groups:
            raise ValueError("cannot add K-FAC matrices with different layer groups")
        n1, n2 = self.num_samples, other.num_samples
        w1, w2 = (n1 / (n1 + n2), n2 / (n1 + n2)) if n1 + n2 > 0 else (0.5, 0.5)
        A = {g: w1 * self.A[g] + w2 * other.A[g] for g in self.kron_groups}
        G = {g: self.G[g] + other.G[g] for g in self.kron_groups}
        return KFAC(self.kron_groups, A, G, self.layout, self.rest + other.rest, **self.meta)

    def _scale(self, factor: float) -> KFAC:
        meta = {**self.meta, "num_samples": self.num_samples * factor}
        G = {g: factor * f for g, f in self.G.items()}
        return KFAC(self.kron_groups, self.A, G, self.layout, self.rest * factor, **meta)

    @override
    def _restrict_partial(self, group: str, name: str) -> KFAC:
        # The weight's or the bias's block alone is a sub-matrix of A times G: again
        # a Kronecker product.
        spec = self.kron_groups[group]
        a = self.A[group] if self.A[group].dim() == 2 else torch.diag(self.A[group])
        if name == spec.bias:
            sub, a_sub = KronGroup(name), a[-1:, -1:]
        else:
            sub, a_sub = KronGroup(name, None, spec.input_major), a[:-1, :-1]
        layout = self.layout.subset([name])
        return KFAC({group: sub}, {group: a_sub}, {group: self.G[group]}, layout, None, **self.meta)

    @override
    def _subset(
        self, groups: dict[str, KronGroup], layout: ParamLayout, rest: Tensor | None
    ) -> KFAC:
        A = {g: self.A[g] for g in groups}
        return KFAC(groups, A, {g: self.G[g] for g in groups}, layout, rest, **self.meta)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {"rest": self.rest}
        for i, g in enumerate(self.kron_groups):
            tensors[f"A.{i}"], tensors[f"G.{i}"] = self.A[g], self.G[g]
        return tensors, self._extra()

    @classmethod
    def _from_state(
        cls, layout: ParamLayout, tensors: dict[str, Tensor], extra: dict[str, Any], **meta: Any
    ) -> KFAC:
        groups = cls._groups_from(extra)
        A = {g: tensors[f"A.{i}"] for i, g in enumerate(groups)}
        G = {g: tensors[f"G.{i}"] for i, g in enumerate(groups)}
        return cls(groups, A, G, layout, tensors["rest"], **meta)
