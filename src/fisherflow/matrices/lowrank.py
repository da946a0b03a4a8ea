"""Low rank plus diagonal: ``U diag(s) Uᵀ + diag(d)``.

Reference: the Woodbury identity and the matrix determinant lemma (e.g. Golub &
Van Loan, *Matrix Computations*, 4th ed., §2.1.4); used for Fisher/Laplace
approximations by e.g. Maddox et al. (2019, SWAG) and laplace-torch's LowRank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from fisherflow.matrices.base import FisherMatrix
from fisherflow.matrices.dense import Dense
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.linalg import (
    check_nonsingular,
    default_rcond,
    eigh,
    spectral_pinv,
    spectral_power,
)
from fisherflow.matrices.validate import all_finite, check_damping, check_vector

__all__ = ["LowRank", "orthonormal_factor"]


def orthonormal_factor(B: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigen-factor ``B Bᵀ = U diag(s) Uᵀ`` with orthonormal ``U``, ``s`` descending.

    Cost O(P r²) for ``B`` of shape ``(P, r)`` (a thin QR and an r×r ``eigh``); never P×P.

    Args:
        B: ``(P, r)`` factor.
        rank: Keep only the top ``rank`` components (truncation), default all.

    Returns:
        ``(U, s)`` with ``U`` of shape ``(P, k)`` and ``s >= 0`` of shape ``(k,)``.
    """
    Q, R = torch.linalg.qr(B)
    vals, vecs = eigh(R @ R.T)
    order = torch.argsort(vals, descending=True)
    if rank is not None:
        order = order[:rank]
    return Q @ vecs[:, order], vals[order].clamp_min(0)


class LowRank(FisherMatrix):
    """``U diag(s) Uᵀ + diag(d)``: a rank-r PSD part plus a diagonal.

    ``U`` is kept with orthonormal columns. With ``d`` a multiple of the identity
    ("isotropic", including ``d = 0``) the eigendecomposition is exact and every
    operation, any ``power`` included, is O(P r). With a general ``d``:

    * ``solve``, ``logdet`` and ``sample`` are exact via Woodbury and the determinant
      lemma, O(P r²);
    * ``eigvalsh`` materialises the dense matrix (O(P³); for small P);
    * ``pinv_solve`` and ``rank`` are exact: isotropic in O(P r); otherwise by
      Woodbury (O(P r²)) when the diagonal alone keeps every eigenvalue above the
      cut-off, else through the dense matrix (O(P³));
    * ``power``/``inverse`` exist only for p in {0, 1}: ``(D + USUᵀ + λI)^p`` has no
      low-rank-plus-diagonal form for other p, so they raise ``NotImplementedError``
      (use ``solve``, or ``Dense.from_fisher(F).power(p, damping)`` for small P).

    **Addition** concatenates the low-rank factors (exact) and truncates back to the
    larger of the two ranks (an approximation: the smallest components are dropped);
    the diagonals add exactly.

    Args:
        U: ``(P, r)`` factor (any columns; re-orthonormalised).
        s: ``(r,)`` weights ``>= 0``.
        layout: The parameter layout.
        diag: ``(P,)`` diagonal ``d >= 0`` or ``None`` for zero.
        **meta: ``num_samples``, ``kind``, ``likelihood``.

    Example:
        >>> layout = ParamLayout.from_shapes({"t": (2,)})
        >>> F = LowRank(torch.tensor([[1.0], [0.0]]), torch.tensor([3.0]), layout,
        ...             diag=torch.ones(2))
        >>> F.solve(torch.tensor([4.0, 1.0]), damping=0.0).tolist()
        [1.0, 1.0]
    """

    structure = "lowrank"

    def __init__(
        self,
        U: Tensor,
        s: Tensor,
        layout: ParamLayout,
        diag: Tensor | None = None,
        *,
        _canonical: bool = False,
        **meta: Any,
    ) -> None:
        super().__init__(layout, **meta)
        if not isinstance(U, Tensor) or U.dim() != 2 or U.shape[0] != layout.size:
            raise ValueError(
                f"U must be a ({layout.size}, r) tensor, got "
                f"{tuple(U.shape) if isinstance(U, Tensor) else type(U).__name__}"
            )
        if not all_finite(U):
            raise ValueError("U contains NaN or Inf")
        s = check_vector(s, U.shape[1], "s", nonnegative=not _canonical)
        if diag is None:
            diag = torch.zeros(layout.size, dtype=U.dtype, device=U.device)
        self.diag = check_vector(diag, layout.size, "diag")
        if _canonical:
            self.U, self.s = U, s
        else:
            self.U, self.s = orthonormal_factor(U * s.sqrt())
        self.isotropic = bool((self.diag == self.diag[0]).all()) if layout.size else True
        scale = 1 + (self.s.abs().max() if self.num_components else 0.0)
        if self.isotropic and bool((self.s + self._c() < -1e-6 * scale).any()):
            raise ValueError("U diag(s) Uᵀ + d I must be PSD")

    @property
    def num_components(self) -> int:
        """Number of low-rank components r (the numerical rank is :meth:`rank`)."""
        return self.s.shape[0]

    @override
    def _reference_tensor(self) -> Tensor:
        return self.U

    def _c(self) -> Tensor:
        return self.diag[0] if self.size else self.diag.new_zeros(())

    def _lowrank_mv(self, coef: Tensor, v: Tensor) -> Tensor:
        return self.U @ (coef[:, None] * (self.U.T @ v))

    def _matmat(self, v: Tensor) -> Tensor:
        return self.diag[:, None] * v + self._lowrank_mv(self.s, v)

    def _diagonal(self) -> Tensor:
        return self.diag + (self.U * self.U) @ self.s

    def _eigvals(self) -> Tensor:
        if self.isotropic:
            c = self._c()
            return torch.cat([self.s + c, c.expand(self.size - self.num_components)])
        return eigh(self.to_dense())[0]

    def _whitened(self, damping: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(D_λ^{-1/2}, Z, θ)`` with ``F + λI = D_λ^{1/2}(I + Z diag(θ) Zᵀ) D_λ^{1/2}``."""
        d = self.diag + damping
        if bool((d <= 0).any()):
            raise ValueError(
                f"diag + damping must be > 0 to invert a low-rank Fisher (damping={damping}); "
                "pass damping > 0"
            )
        inv_sqrt = d.rsqrt()
        Z, theta = orthonormal_factor(inv_sqrt[:, None] * self.U * self.s.sqrt())
        return inv_sqrt, Z, theta

    def _power_matmat(self, v: Tensor, p: float, damping: float) -> Tensor:
        if self.isotropic:
            c = self._c()
            base = spectral_power(c.reshape(1), p, damping)
            top = spectral_power(self.s + c, p, damping)
            return base * v + self._lowrank_mv(top - base, v)
        if p == 0:
            return v.clone()
        if p == 1:
            return self._matmat(v) + damping * v
        if p == -1:
            inv_sqrt, Z, theta = self._whitened(damping)
            x = inv_sqrt[:, None] * v
            x = x + Z @ ((1 / (1 + theta) - 1)[:, None] * (Z.T @ x))
            return inv_sqrt[:, None] * x
        raise NotImplementedError(self._no_power(p))

    def _well_conditioned(self, damping: float, cut: float) -> bool:
        """Whether ``min(d) + λ > cut · λ_max`` (λ_max bounded by ``max d + λ + max s``).

        Then no eigenvalue of ``F + λI`` falls below the cut-off (``USUᵀ`` is PSD, so
        every eigenvalue is at least ``min(d) + λ``) and the pseudo-inverse is the inverse.
        """
        if bool((self.s < 0).any()):
            return False
        d = self.diag + damping
        top = d.max() + (self.s.max() if self.num_components else 0.0)
        return bool(d.min() > cut * top)

    @override
    def _pinv_matmat(self, v: Tensor, damping: float, rcond: float | None) -> Tensor:
        cut = default_rcond(rcond, self.size, self.dtype)
        if self.isotropic:
            c = self._c().reshape(1)
            top = torch.cat([self.s + c, c]).clamp_min(0).max() + damping
            base = spectral_pinv(c, damping, cut, top)
            inv = spectral_pinv(self.s + c, damping, cut, top)
            return base * v + self._lowrank_mv(inv - base, v)
        if self._well_conditioned(damping, cut):
            return self._power_matmat(v, -1.0, damping)
        return super()._pinv_matmat(v, damping, rcond)

    @override
    def _rank(self, rcond: float | None) -> int:
        if not self.isotropic and self._well_conditioned(
            0.0, default_rcond(rcond, self.size, self.dtype)
        ):
            return self.size
        return super()._rank(rcond)

    def _inv_sqrt_matmat(self, z: Tensor, damping: float) -> Tensor:
        if self.isotropic:
            return self._power_matmat(z, -0.5, damping)
        inv_sqrt, Z, theta = self._whitened(damping)
        x = z + Z @ ((1 / (1 + theta).sqrt() - 1)[:, None] * (Z.T @ z))
        return inv_sqrt[:, None] * x

    def logdet(self, damping: float) -> Tensor:
        """``log det(F + damping I)`` by the determinant lemma, O(P r²).

        Raises:
            ValueError: If ``F + damping I`` is singular, or ``damping`` is invalid.
            TypeError: If ``damping`` is not a real number.
        """
        lam = check_damping(damping)
        if self.isotropic:
            return super().logdet(lam)
        check_nonsingular(self.diag + lam, lam)
        inv_sqrt, _, theta = self._whitened(lam)
        return -2 * torch.log(inv_sqrt).sum() + torch.log1p(theta).sum()

    def _no_power(self, p: float) -> str:
        return (
            f"power p={p} of a low-rank Fisher with a non-isotropic diagonal has no "
            "low-rank-plus-diagonal form; use solve() or sample() (exact), or "
            "Dense.from_fisher(F).power(p, damping) for small P"
        )

    def _power(self, p: float, damping: float) -> LowRank:
        if self.isotropic:
            c = self._c()
            base = spectral_power(c.reshape(1), p, damping)
            top = spectral_power(self.s + c, p, damping)
            diag = base.expand(self.size).clone()
            return LowRank(self.U, top - base, self.layout, diag, _canonical=True, **self.meta)
        if p == 1:
            return LowRank(
                self.U, self.s, self.layout, self.diag + damping, _canonical=True, **self.meta
            )
        if p == 0:
            ones = torch.ones_like(self.diag)
            return LowRank(self.U, self.s * 0, self.layout, ones, _canonical=True, **self.meta)
        raise NotImplementedError(self._no_power(p))

    def _factor(self) -> Tensor:
        if bool((self.s < 0).any()):
            raise ValueError("this operation needs a PSD low-rank part (s >= 0)")
        return self.U * self.s.sqrt()

    def _add(self, other: FisherMatrix) -> LowRank:
        assert isinstance(other, LowRank)
        B = torch.cat([self._factor(), other._factor()], dim=1)
        U, s = orthonormal_factor(B, rank=max(self.num_components, other.num_components))
        return LowRank(U, s, self.layout, self.diag + other.diag, _canonical=True, **self.meta)

    def _scale(self, factor: float) -> LowRank:
        meta = {**self.meta, "num_samples": self.num_samples * factor}
        return LowRank(
            self.U, self.s * factor, self.layout, self.diag * factor, _canonical=True, **meta
        )

    def _restrict(self, names: list[str]) -> FisherMatrix:
        idx = self.layout.indices(names).to(self.device)
        layout = self.layout.subset(names)
        if bool((self.s < 0).any()):
            return Dense(self.to_dense()[idx][:, idx], layout, **self.meta)
        return LowRank(self.U[idx], self.s, layout, self.diag[idx], **self.meta)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"U": self.U, "s": self.s, "diag": self.diag}, {}

    @classmethod
    def _from_state(
        cls, layout: ParamLayout, tensors: dict[str, Tensor], extra: dict[str, Any], **meta: Any
    ) -> LowRank:
        U = tensors["U"]
        if U.dim() == 2:
            gram = U.T.double() @ U.double()
            if not torch.allclose(gram, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-4):
                raise ValueError("U of a stored low-rank Fisher must have orthonormal columns")
        return cls(U, tensors["s"], layout, tensors["diag"], _canonical=True, **meta)
