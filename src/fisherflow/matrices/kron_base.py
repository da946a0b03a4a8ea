"""Shared machinery of the Kronecker-factored structures (K-FAC and EKFAC).

Both hold a set of :class:`~fisherflow.matrices.kron.KronGroup` layers and a
diagonal for every parameter outside those layers (e.g. LayerNorm scales); a
subclass supplies the per-group operations.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from fisherflow.matrices.base import FisherMatrix
from fisherflow.matrices.diagonal import Diagonal
from fisherflow.matrices.kron import KronGroup
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import default_rcond, spectral_pinv, spectral_power
from fisherflow.matrices.validate import check_partition, check_vector

__all__ = ["KronStructure"]


class KronStructure(FisherMatrix):
    """Base of K-FAC and EKFAC: Kronecker groups plus a diagonal for the rest.

    Args:
        groups: ``{group name: KronGroup}``.
        layout: The parameter layout; parameters in no group form the "rest".
        rest: Diagonal information ``(P_rest,)`` of the remaining parameters, in layout
            order (``None`` when every parameter is in a group).
        **meta: ``num_samples``, ``kind``, ``likelihood``.
    """

    def __init__(
        self,
        groups: Mapping[str, KronGroup],
        layout: ParamLayout,
        rest: Tensor | None,
        **meta: Any,
    ) -> None:
        super().__init__(layout, **meta)
        for g, spec in groups.items():
            if not isinstance(spec, KronGroup):
                raise TypeError(f"groups[{g!r}] must be a KronGroup, got {type(spec).__name__}")
        check_partition(layout, {g: s.names for g, s in groups.items()})
        self.kron_groups = dict(groups)
        covered = {n for s in groups.values() for n in s.names}
        self.rest_names = [n for n in layout.names if n not in covered]
        rest_layout = layout.subset(self.rest_names)
        if rest is None:
            if self.rest_names:
                raise ValueError(
                    "rest must give the diagonal of parameters outside the groups: "
                    f"{self.rest_names}"
                )
            rest = torch.zeros(0, dtype=self._group_dtype(), device=self._group_device())
        self.rest = check_vector(rest, rest_layout.size, "rest")
        self._rest_index = layout.indices(self.rest_names).to(self.rest.device)
        self.dims = {g: s.dims(layout) for g, s in groups.items()}

    # per-group operations supplied by subclasses --------------------------------
    @abc.abstractmethod
    def _group_dtype(self) -> torch.dtype: ...

    @abc.abstractmethod
    def _group_device(self) -> torch.device: ...

    @abc.abstractmethod
    def _group_matmat(self, g: str, x: Tensor) -> Tensor:
        """Apply the group's block to ``(k, n_out, n_cols)`` views."""

    @abc.abstractmethod
    def _group_diagonal(self, g: str) -> Tensor:
        """The block's diagonal as an ``(n_out, n_cols)`` view."""

    @abc.abstractmethod
    def _group_eigvals(self, g: str) -> Tensor:
        """The block's eigenvalues, any order."""

    @abc.abstractmethod
    def _group_power_matmat(self, g: str, x: Tensor, p: float, damping: float) -> Tensor:
        """Apply ``(block + damping I)^p`` to ``(k, n_out, n_cols)`` views."""

    @abc.abstractmethod
    def _group_spectral_matmat(self, g: str, x: Tensor, fn: Any) -> Tensor:
        """Apply ``Q fn(S) Qᵀ`` (``fn`` of the block's ``(n_out, n_cols)`` eigenvalues)."""

    # derived ----------------------------------------------------------------------
    @override
    def groups(self) -> dict[str, list[str]]:
        return {g: s.names for g, s in self.kron_groups.items()}

    @override
    def _reference_tensor(self) -> Tensor:
        return self.rest

    def _map(self, v: Tensor, fn: Any, rest_fn: Any) -> Tensor:
        out = torch.empty_like(v)
        for g, spec in self.kron_groups.items():
            spec.scatter(self.layout, fn(g, spec.gather(self.layout, v)), out)
        if self.rest_names:
            out[self._rest_index] = rest_fn(v[self._rest_index])
        return out

    def _matmat(self, v: Tensor) -> Tensor:
        return self._map(v, self._group_matmat, lambda x: self.rest[:, None] * x)

    def _power_matmat(self, v: Tensor, p: float, damping: float) -> Tensor:
        rest_pow = spectral_power(self.rest, p, damping)
        return self._map(
            v,
            lambda g, x: self._group_power_matmat(g, x, p, damping),
            lambda x: rest_pow[:, None] * x,
        )

    def _pinv_matmat(self, v: Tensor, damping: float, rcond: float | None) -> Tensor:
        # one cut-off for the whole matrix: relative to its largest damped eigenvalue
        top = self._eigvals().clamp_min(0).max() + damping if self.size else None
        cut = default_rcond(rcond, self.size, self.dtype)

        def pinv(vals: Tensor) -> Tensor:
            return spectral_pinv(vals, damping, cut, top)

        rest_pinv = pinv(self.rest)
        return self._map(
            v,
            lambda g, x: self._group_spectral_matmat(g, x, pinv),
            lambda x: rest_pinv[:, None] * x,
        )

    def _diagonal(self) -> Tensor:
        out = torch.empty(self.size, 1, dtype=self.dtype, device=self.device)
        for g, spec in self.kron_groups.items():
            spec.scatter(self.layout, self._group_diagonal(g)[None], out)
        out[self._rest_index, 0] = self.rest
        return out[:, 0]

    def _eigvals(self) -> Tensor:
        parts = [self._group_eigvals(g).reshape(-1) for g in self.kron_groups]
        return torch.cat([*parts, self.rest])

    def _rest_of(self, names: list[str]) -> Tensor:
        """Entries of ``rest`` for a subset of the rest parameters (layout order kept)."""
        sub = self.layout.subset(self.rest_names)
        idx = sub.indices(names).to(self.device)
        return self.rest[idx]

    @abc.abstractmethod
    def _subset(
        self, groups: dict[str, KronGroup], layout: ParamLayout, rest: Tensor | None
    ) -> FisherMatrix:
        """The same structure over whole ``groups`` plus the given ``rest`` diagonal."""

    @abc.abstractmethod
    def _restrict_partial(self, group: str, name: str) -> FisherMatrix:
        """The block of one parameter of a layer (its weight or its bias alone)."""

    @override
    def _restrict(self, names: list[str]) -> FisherMatrix:
        wanted = set(names)
        groups = {g: s for g, s in self.kron_groups.items() if set(s.names) <= wanted}
        taken = {n for s in groups.values() for n in s.names}
        rest = [n for n in names if n not in taken]
        partial = [n for n in rest if n not in self.rest_names]
        if partial:
            (name,) = partial if len(names) == 1 else (None,)
            if name is None:
                raise KeyError(f"{partial} are parts of layers; ask for one parameter or layer")
            g = next(g for g, s in self.kron_groups.items() if name in s.names)
            return self._restrict_partial(g, name)
        layout = self.layout.subset([n for s in groups.values() for n in s.names] + rest)
        if not groups:
            return Diagonal(self._rest_of(rest), layout, **self.meta)
        return self._subset(groups, layout, self._rest_of(rest) if rest else None)

    def _extra(self) -> dict[str, Any]:
        return {"groups": [[g, s.to_json()] for g, s in self.kron_groups.items()]}

    @staticmethod
    def _groups_from(extra: dict[str, Any]) -> dict[str, KronGroup]:
        return {g: KronGroup.from_json(spec) for g, spec in extra["groups"]}
