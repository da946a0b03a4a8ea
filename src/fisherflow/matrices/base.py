"""The Fisher matrix users hold: every public operation, derived from the abstract core.

A structure implements a small abstract core of **3 members** — ``_matmat``
(``F @ V``), ``_state`` and ``_from_state`` (its tensors, for files, ``to`` and
``all_reduce``) — and sets the class attribute ``structure``, which registers it in
:data:`fisherflow.matrices.registry.STRUCTURES`. The core, the metadata and the
overridable defaults derived from it are in :mod:`fisherflow.matrices.core`; this
module derives every public operation from them, with one name and one meaning
across all structures (argument checks, vector forms, arithmetic, files).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from fisherflow.matrices import distributed, io
from fisherflow.matrices.core import FisherCore
from fisherflow.matrices.layout import ParamLayout, Vector
from fisherflow.matrices.linalg import check_nonsingular, linear_operator
from fisherflow.matrices.registry import STRUCTURES
from fisherflow.matrices.registry import register as register_structure
from fisherflow.matrices.validate import (
    KINDS,
    check_columns,
    check_damping,
    check_power,
    check_rcond,
)

__all__ = ["KINDS", "STRUCTURES", "FisherMatrix"]


class FisherMatrix(FisherCore):
    """Summed Fisher information over ``num_samples`` observations, in some structure.

    The matrix holds the **sum** of per-observation information (information is
    additive): ``F + G`` adds information and sample counts, ``γ * F`` forgets,
    ``F.mean()`` is the per-observation average.

    Args:
        layout: The parameter layout the matrix is defined over.
        num_samples: Number of observations behind the estimate (>= 0, may be
            fractional after forgetting).
        kind: ``"exact"``, ``"mc"``, ``"empirical"`` or ``None`` (not estimated from a
            model, e.g. a prior).
        likelihood: Name of the likelihood the information is under, or ``None``.

    Raises:
        TypeError: If ``layout`` is not a :class:`ParamLayout`.
        ValueError: If ``num_samples`` is negative or not finite, or ``kind`` is unknown.

    A new structure implements 3 abstract members (``_matmat``, ``_state``,
    ``_from_state``; see :class:`~fisherflow.matrices.core.FisherCore` for the
    defaults it may override) and names itself with ``structure = "..."``;
    subclassing with ``register=False`` keeps it out of :data:`STRUCTURES` (e.g. in
    tests).
    """

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register and "structure" in cls.__dict__:
            register_structure(cls)

    # --------------------------------------------------------------- vectors
    def _as_columns(self, v: Vector, name: str = "v") -> tuple[Tensor, bool, bool]:
        """Flatten ``v`` to ``(P, k)`` in the matrix dtype; remember its form."""
        flat, vector, as_dict = check_columns(v, self.layout, name)
        cols = flat.reshape(self.size, -1).to(dtype=self.dtype, device=self.device)
        return cols, vector, as_dict

    def _as_form(self, cols: Tensor, vector: bool, as_dict: bool) -> Vector:
        out = cols[:, 0] if vector else cols
        return self.layout.unflatten(out) if as_dict else out

    # ------------------------------------------------------------ operations
    def mv(self, v: Vector) -> Vector:
        """Matrix-vector product ``F v``.

        Args:
            v: A flat ``(P,)`` / ``(P, k)`` tensor or a dict ``name -> tensor``.

        Returns:
            ``F v`` in the same form as ``v``.

        Raises:
            ValueError: If ``v`` has the wrong length or contains NaN/Inf.
        """
        cols, vector, as_dict = self._as_columns(v)
        return self._as_form(self._matmat(cols), vector, as_dict)

    def __matmul__(self, v: Vector) -> Vector:
        return self.mv(v)

    def solve(self, v: Vector, damping: float) -> Vector:
        """Solve ``(F + damping I) x = v``; ``damping`` is explicit (>= 0)."""
        lam = check_damping(damping)
        cols, vector, as_dict = self._as_columns(v)
        return self._as_form(self._power_matmat(cols, -1.0, lam), vector, as_dict)

    def pinv_solve(self, v: Vector, damping: float = 0.0, rcond: float | None = None) -> Vector:
        """``(F + damping I)⁺ v``: a solve that tolerates a singular F.

        Eigenvalues of ``F + damping I`` at or below ``rcond`` times the largest count
        as zero (``rcond=None``: ``P · eps(dtype)``, numpy's and torch's tolerance), and
        directions along them get no component. Dense and block structures apply the
        cut-off to the Jacobi-scaled matrix ``S (F + λI) S`` (``S = diag(F + λI)^{-1/2}``,
        per block for block), which is accurate for parameters on very different
        scales and equals the Moore-Penrose pseudo-inverse when ``F + λI`` is
        nonsingular or has a constant diagonal; every other structure applies the
        Moore-Penrose pseudo-inverse in its own eigenbasis.

        Args:
            v: A flat ``(P,)`` / ``(P, k)`` tensor or a dict ``name -> tensor``.
            damping: λ >= 0 added to the diagonal before the pseudo-inverse.
            rcond: Relative eigenvalue cut-off in ``[0, 1)``, or ``None``.

        Returns:
            ``(F + damping I)⁺ v`` in the same form as ``v``.

        Raises:
            ValueError: If ``v`` has the wrong length or NaN/Inf, or ``damping`` /
                ``rcond`` is out of range.
            TypeError: If ``v``, ``damping`` or ``rcond`` has the wrong type.
        """
        lam, cut = check_damping(damping), check_rcond(rcond)
        cols, vector, as_dict = self._as_columns(v)
        return self._as_form(self._pinv_matmat(cols, lam, cut), vector, as_dict)

    def rank(self, rcond: float | None = None) -> int:
        """Numerical rank: eigenvalues above ``rcond`` times the largest.

        ``rcond=None`` means ``P · eps(dtype)``. Dense and block count the eigenvalues
        of the Jacobi-scaled matrix (per block), consistent with :meth:`pinv_solve`.

        Raises:
            ValueError: If ``rcond`` is outside ``[0, 1)``.
            TypeError: If ``rcond`` is neither ``None`` nor a real number.
        """
        return self._rank(check_rcond(rcond))

    def power(self, p: float, damping: float) -> FisherMatrix:
        """``(F + damping I)^p`` for any real ``p`` (e.g. -1, -1/2, -1/4), as a structure.

        ``damping`` is explicit (>= 0, no default); negative powers of a singular
        matrix need ``damping > 0``.

        Raises:
            ValueError: If ``p < 0`` and ``F + damping I`` is singular, or ``damping``
                is negative or not finite.
            TypeError: If ``p`` or ``damping`` is not a real number.
        """
        return self._power(check_power(p), check_damping(damping))

    def inverse(self, damping: float) -> FisherMatrix:
        """``(F + damping I)^-1``; ``damping`` is explicit (>= 0)."""
        return self._power(-1.0, check_damping(damping))

    def diagonal(self) -> Tensor:
        """The diagonal of F as a flat ``(P,)`` tensor."""
        return self._diagonal()

    def trace(self) -> Tensor:
        """``tr F`` (a 0-dim tensor)."""
        return self._diagonal().sum()

    def logdet(self, damping: float) -> Tensor:
        """``log det(F + damping I)``; ``damping`` is explicit (>= 0, no default).

        Raises:
            ValueError: If ``F + damping I`` is singular (an eigenvalue, clamped at
                zero, plus ``damping`` is 0: the log-determinant would be -inf), or
                ``damping`` is negative or not finite.
            TypeError: If ``damping`` is not a real number.
        """
        lam = check_damping(damping)
        shifted = self._eigvals().clamp_min(0) + lam
        check_nonsingular(shifted, lam)
        return torch.log(shifted).sum()

    def eigvalsh(self, k: int | None = None) -> Tensor:
        """Eigenvalues of F in descending order; the top ``k`` if given.

        Raises:
            ValueError: If ``k`` is not an integer in ``[1, P]``.
        """
        vals = torch.sort(self._eigvals(), descending=True).values
        if k is None:
            return vals
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.size:
            raise ValueError(f"k must be an integer in [1, {self.size}], got {k!r}")
        return vals[:k]

    def quad(self, v: Vector) -> Tensor:
        """The quadratic form ``vᵀ F v`` (per column for a ``(P, k)`` input)."""
        cols, vector, _ = self._as_columns(v)
        out = (cols * self._matmat(cols)).sum(0)
        return out[0] if vector else out

    def sample(self, n: int, damping: float, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples from ``N(0, (F + damping I)^-1)``.

        Uses the symmetric square root: ``x = (F + λI)^{-1/2} z`` with ``z ~ N(0, I)``.

        Returns:
            A ``(n, P)`` tensor; ``layout.unflatten(x.T)`` gives a dict.

        Raises:
            ValueError: If ``n`` is not a positive integer or F + λI is singular.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        lam = check_damping(damping)
        z = torch.randn(self.size, n, generator=generator, dtype=self.dtype, device=self.device)
        return self._inv_sqrt_matmat(z, lam).T

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` applying F (float64 numpy)."""
        return linear_operator(self._matmat, self.size, self.dtype, self.device)

    def with_layout(self, layout: ParamLayout) -> FisherMatrix:
        """The same matrix over another layout of equal size (new names and shapes).

        Raises:
            TypeError: If ``layout`` is not a :class:`ParamLayout`.
            ValueError: If the sizes differ, or the structure names its parameters in
                groups (block, K-FAC, EKFAC), which a new layout would not have.
        """
        if not isinstance(layout, ParamLayout):
            raise TypeError(f"layout must be a ParamLayout, got {type(layout).__name__}")
        if layout == self.layout:
            return self
        if layout.size != self.size or self.groups():
            raise ValueError(
                f"a {self.structure!r} Fisher over {self.layout.to_json()} cannot move to "
                f"layout {layout.to_json()}: "
                + ("sizes differ" if layout.size != self.size else "its groups name parameters")
            )
        tensors, extra = self._state()
        return type(self)._from_state(layout, tensors, extra, **self.meta)

    def mean(self) -> FisherMatrix:
        """Per-observation average ``F / num_samples`` (``num_samples`` becomes 1).

        Raises:
            ValueError: If ``num_samples`` is 0.
        """
        if self.num_samples <= 0:
            raise ValueError("mean() needs num_samples > 0, got 0")
        return self._scale(1.0 / self.num_samples)

    def block(self, name: str) -> FisherMatrix:
        """The diagonal block of F for one parameter or one group (see :meth:`groups`).

        Raises:
            KeyError: If ``name`` is neither a parameter nor a group.
        """
        groups = self.groups()
        if name in groups:
            return self._restrict(list(groups[name]))
        if name in self.layout:
            return self._restrict([name])
        raise KeyError(
            f"{name!r} is neither a parameter ({list(self.layout.names)}) "
            f"nor a group ({list(groups)})"
        )

    # ------------------------------------------------------------ arithmetic
    def _merged_meta(self, other: FisherMatrix) -> dict[str, Any]:
        if other.layout != self.layout:
            raise ValueError(
                "cannot add Fisher matrices over different layouts: "
                f"{self.layout.to_json()} vs {other.layout.to_json()}"
            )
        merged: dict[str, Any] = {"num_samples": self.num_samples + other.num_samples}
        for key in ("kind", "likelihood"):
            a, b = getattr(self, key), getattr(other, key)
            if a is not None and b is not None and a != b:
                raise ValueError(f"cannot add information of different {key}: {a!r} and {b!r}")
            merged[key] = a if a is not None else b
        return merged

    def __add__(self, other: object) -> FisherMatrix:
        if not isinstance(other, FisherMatrix):
            return NotImplemented
        meta = self._merged_meta(other)
        if type(other) is not type(self):
            raise TypeError(
                f"cannot add a {other.structure!r} Fisher to a {self.structure!r} Fisher; "
                "convert one first (e.g. Dense.from_fisher)"
            )
        out = self._add(other)
        out.num_samples = meta["num_samples"]
        out.kind = meta["kind"]
        out.likelihood = meta["likelihood"]
        return out

    def __mul__(self, factor: object) -> FisherMatrix:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        value = float(factor)
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"a Fisher matrix can only be scaled by a finite factor >= 0, got {value}"
            )
        return self._scale(value)

    __rmul__ = __mul__

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FisherMatrix:
        """A copy on another device and/or floating dtype (metadata kept).

        Raises:
            ValueError: If ``dtype`` is not a floating-point dtype.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        tensors, extra = self._state()
        moved = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        return type(self)._from_state(self.layout, moved, extra, **self.meta)

    # -------------------------------------------------------------- files
    def save(self, path: str) -> None:
        """Write F to a safetensors file with JSON metadata, atomically."""
        io.save(self, path)

    def all_reduce(self, group: Any = None) -> FisherMatrix:
        """Sum F across the ranks of a ``torch.distributed`` process group.

        Every rank must hold the same structure and layout; every rank returns the
        same result, equal to adding the per-rank matrices in rank order with ``+``
        (exact for dense, diagonal and block; see each structure for the rest).
        """
        return distributed.all_reduce(self, group)
