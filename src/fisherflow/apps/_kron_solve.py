"""Sums of two Kronecker products solved exactly by simultaneous diagonalisation.

Per K-FAC layer a Fisher acts on the layer's matrix view ``X`` (``n_out × n_cols``,
see :mod:`fisherflow.matrices.kron`) as ``X ↦ G X A``. Two symmetric PSD matrices
are diagonalised together by one congruence (the symmetric-definite generalised
eigenproblem, Golub & Van Loan, 2013, *Matrix Computations*, §8.7): there is an
invertible ``S_A`` with ``S_Aᵀ A₁ S_A = diag(a₁)`` and ``S_Aᵀ A₂ S_A = diag(a₂)``, and
likewise ``S_G`` for ``(G₁, G₂)``. Writing ``X = S_G Y S_Aᵀ``,

    w₁G₁XA₁ + w₂G₂XA₂ = S_G⁻ᵀ [(w₁ g₁a₁ᵀ + w₂ g₂a₂ᵀ) ∘ Y] S_A⁻¹,

so ``(w₁G₁⊗A₁ + w₂G₂⊗A₂) x = b`` is solved by ``Y = (S_Gᵀ B S_A) / D`` elementwise,
``X = S_G Y S_Aᵀ``, with ``D = w₁g₁a₁ᵀ + w₂g₂a₂ᵀ``: two eigendecompositions per
factor, O(n_out³ + n_cols³) once and O(n_out² n_cols + n_out n_cols²) per solve.
Where ``D`` is 0 (no model informs that generalised direction) ``Y`` is 0; for a
right-hand side in the range of the sum (``Σ wᵢFᵢvᵢ`` is) this is a solution of the
system, the pseudo-inverse one when the uninformed directions are orthogonal to the
informed ones (inputs no model saw, outputs no model moved), otherwise one that may
differ from it along the null space.

**Damping.** ``λI`` in the same coordinates is ``λ (S_GᵀS_G) ⊗ (S_AᵀS_A)``, which is
not diagonal: three Kronecker terms have no joint diagonalisation, so
``(Σ wᵢFᵢ + λI) x = b`` has no closed-form O(n³) solve, and keeping only the diagonal
of that term fails badly when the factors are ill-conditioned (the whitened basis
mixes directions whose scales differ by many orders). The damped pair instead gives
each term half of λ through its factors, Martens & Grosse's (2015, §6.3) factored
Tikhonov damping: ``wᵢ Gᵢ⊗Aᵢ + λ/2 · I`` becomes ``(wᵢGᵢ + γᵢI) ⊗ (Aᵢ + αᵢI)`` with
``γᵢαᵢ = λ/2`` and ``αᵢ/γᵢ = πᵢ² = (tr Aᵢ/n_cols)/(tr wᵢGᵢ/n_out)``. The result is
``Σ wᵢFᵢ + λI`` plus the positive semi-definite cross terms
``γᵢ I⊗Aᵢ + αᵢ wᵢGᵢ⊗I``: a symmetric positive definite preconditioner, never smaller
than the damped sum, whose factors are at least ``αᵢ``, ``γᵢ`` (so the bases are
well conditioned), for conjugate gradients on the exact damped system
(:func:`fisherflow.apps._solve.weighted_solve`).

Written by hand: ``scipy.linalg.eigh(a, b)`` and LAPACK's ``sygv`` need ``b`` positive
definite, and K-FAC factors are often singular (constant input pixels, unused
outputs); the basis here is built on the range of ``a + b`` and runs in torch on the
factors' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fisherflow.matrices import KFAC
from fisherflow.matrices.kron import left, right
from fisherflow.matrices.linalg import default_rcond, eigh

__all__ = ["KronPair", "factored_damping", "psd_factors", "simultaneous_basis"]


def simultaneous_basis(
    b1: Tensor, b2: Tensor, precision: torch.dtype | None = None
) -> tuple[Tensor | None, Tensor, Tensor]:
    """An invertible ``S`` with ``Sᵀ b₁ S = diag(d₁)`` and ``Sᵀ b₂ S = diag(d₂)``.

    Both inputs are symmetric PSD, square or 1-D (a diagonal matrix). The basis is
    built on the range of ``b₁/tr b₁ + b₂/tr b₂`` (whitened, then the eigenvectors of
    the whitened ``b₁``) and completed with an orthonormal basis of its null space,
    where both ``d`` are 0. Reference: Golub & Van Loan (2013), §8.7.2.

    Args:
        b1: First matrix, ``(n, n)`` or diagonal ``(n,)``.
        b2: Second matrix, same size.
        precision: The dtype the matrices were accumulated in (default: theirs);
            eigenvalues of the sum below ``n · eps(precision)`` times the largest are
            rounding noise and count as its null space.

    Returns:
        ``(S, d₁, d₂)``; ``S`` is ``None`` (the identity) when both are diagonal.

    Example:
        >>> b1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> S, d1, d2 = simultaneous_basis(b1, torch.eye(2, dtype=torch.float64))
        >>> torch.allclose(S.T @ b1 @ S, torch.diag(d1))
        True
        >>> sorted(round(v, 6) for v in (d1 / d2).tolist())  # the eigenvalues of b₂⁻¹b₁
        [1.0, 3.0]
    """
    if b1.dim() == 1 and b2.dim() == 1:
        return None, b1.clamp_min(0), b2.clamp_min(0)
    m1 = torch.diag(b1) if b1.dim() == 1 else b1
    m2 = torch.diag(b2) if b2.dim() == 1 else b2
    t1, t2 = float(m1.diagonal().sum()), float(m2.diagonal().sum())
    s1 = 1.0 / t1 if t1 > 0 else 0.0
    s2 = 1.0 / t2 if t2 > 0 else 0.0
    n = m1.shape[0]
    if s1 == 0.0 and s2 == 0.0:
        zero = m1.new_zeros(n)
        return torch.eye(n, dtype=m1.dtype, device=m1.device), zero, zero.clone()
    vals, vecs = eigh(s1 * m1 + s2 * m2)
    keep = vals > default_rcond(None, n, precision or vals.dtype) * vals.max().clamp_min(0)
    whiten = vecs[:, keep] / vals[keep].sqrt()
    mu, rot = eigh(whiten.T @ (s1 * m1) @ whiten)
    mu = mu.clamp(0.0, 1.0)
    S = torch.cat([whiten @ rot, vecs[:, ~keep]], dim=1)
    pad = m1.new_zeros(int((~keep).sum()))
    d1 = torch.cat([mu / s1 if s1 else torch.zeros_like(mu), pad])
    d2 = torch.cat([(1.0 - mu) / s2 if s2 else torch.zeros_like(mu), pad])
    return S, d1, d2


def psd_factors(fisher: KFAC) -> KFAC:
    """``fisher`` with each factor's negative eigenvalues set to 0 (itself if none).

    Factors accumulated in float32 are PSD only up to rounding; a slightly indefinite
    ``G ⊗ A`` makes ``Σ wᵢFᵢ + λI`` indefinite for small λ, and conjugate gradients
    then breaks down (a step with ``pᵀKp <= 0``) far from the solution.
    """
    changed = False

    def project(factor: Tensor) -> Tensor:
        nonlocal changed
        if factor.dim() == 1:
            if bool((factor < 0).any()):
                changed = True
            return factor.clamp_min(0)
        vals, vecs = eigh(factor)
        if bool((vals < 0).any()):
            changed = True
            return (vecs * vals.clamp_min(0)) @ vecs.T
        return factor

    A = {g: project(f) for g, f in fisher.A.items()}
    G = {g: project(f) for g, f in fisher.G.items()}
    if not changed and not bool((fisher.rest < 0).any()):
        return fisher
    rest = fisher.rest.clamp_min(0)
    return KFAC(fisher.kron_groups, A, G, fisher.layout, rest, **fisher.meta)


def factored_damping(G: Tensor, A: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """``(G + γI, A + αI)`` with ``γα = lam`` and ``α/γ = π²`` (Martens & Grosse, §6.3).

    ``π² = (tr A / n_A) / (tr G / n_G)`` (1 when a trace is 0); factors may be 1-D
    (diagonal). ``lam = 0`` returns the factors unchanged.

    Example:
        >>> G, A = factored_damping(torch.eye(2), 4 * torch.eye(3), 4.0)
        >>> G.diagonal().tolist(), A.diagonal().tolist()  # π = 2: γ = 2/2, α = 2·2
        ([2.0, 2.0], [8.0, 8.0, 8.0])
    """
    if lam <= 0:
        return G, A
    mean_g = float(G.sum() if G.dim() == 1 else G.diagonal().sum()) / G.shape[0]
    mean_a = float(A.sum() if A.dim() == 1 else A.diagonal().sum()) / A.shape[0]
    pi = math.sqrt(mean_a / mean_g) if mean_g > 0 and mean_a > 0 else 1.0
    gamma, alpha = math.sqrt(lam) / pi, math.sqrt(lam) * pi
    return _shift(G, gamma), _shift(A, alpha)


def _shift(factor: Tensor, value: float) -> Tensor:
    if factor.dim() == 1:
        return factor + value
    return factor + value * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)


class KronPair:
    """``(P₁ + P₂)⁺`` for two K-FAC matrices over one layout; damped, an approximation.

    ``P₁`` and ``P₂`` are already weighted (``w * F``). Per layer the bases of the
    module docstring are computed once; the rest parameters (a diagonal) add exactly,
    damping included.

    Args:
        first: ``P₁``.
        second: ``P₂``, same layout and layer groups.
        damping: λ >= 0; with λ > 0 the inverse of the factored-damping pair of the
            module docstring (``⪰ P₁ + P₂ + λI``), exact only at λ = 0.
        precision: The dtype the factors were accumulated in (default: theirs): the
            pseudo-inverse cut-offs are ``size · eps(precision)`` relative, so that
            float32 rounding noise in singular factors is not inverted.

    Example:
        >>> from fisherflow.matrices import KronGroup, ParamLayout
        >>> lay = ParamLayout.from_shapes({"w": (1, 2)})
        >>> F1 = KFAC({"l": KronGroup("w")}, {"l": torch.eye(2)}, {"l": torch.ones(1, 1)}, lay)
        >>> F2 = KFAC({"l": KronGroup("w")}, {"l": torch.diag(torch.tensor([1.0, 3.0]))},
        ...           {"l": torch.ones(1, 1)}, lay)
        >>> KronPair(F1, F2).solve(torch.tensor([2.0, 4.0])).tolist()  # (I + diag(1, 3))⁻¹ b
        [1.0, 1.0]
    """

    def __init__(
        self,
        first: KFAC,
        second: KFAC,
        damping: float = 0.0,
        precision: torch.dtype | None = None,
    ) -> None:
        self.layout, self.groups = first.layout, first.kron_groups
        self.damping = damping
        self._bases: dict[str, tuple[Tensor | None, Tensor | None, Tensor]] = {}
        for g in self.groups:
            G1, A1 = factored_damping(first.G[g], first.A[g], damping / 2)
            G2, A2 = factored_damping(second.G[g], second.A[g], damping / 2)
            # damped factors are definite: no cut-off (a cut direction would be a 0 here)
            cut = precision if damping == 0 else None
            SG, g1, g2 = simultaneous_basis(G1, G2, cut)
            SA, a1, a2 = simultaneous_basis(A1, A2, cut)
            denom = torch.outer(g1, a1) + torch.outer(g2, a2)
            self._bases[g] = (SG, SA, _reciprocal(denom, damping, precision))
        rest = first.rest + second.rest + damping
        self._rest = _reciprocal(rest, damping, precision)
        self._rest_index = self.layout.indices(first.rest_names).to(first.rest.device)

    def _group_solve(self, g: str, x: Tensor) -> Tensor:
        SG, SA, inv = self._bases[g]
        y = right(left(None if SG is None else SG.T, x), SA) * inv
        return right(left(SG, y), None if SA is None else SA.T)

    def solve(self, b: Tensor) -> Tensor:
        """Apply the (damped) inverse to flat ``(P,)`` or ``(P, k)`` columns in layout order."""
        cols = b[:, None] if b.dim() == 1 else b
        out = _map(self, cols, self._group_solve, lambda v: self._rest[:, None] * v)
        return out[:, 0] if b.dim() == 1 else out


def _reciprocal(denom: Tensor, damping: float, precision: torch.dtype | None) -> Tensor:
    """``1 / denom``; undamped, 0 where ``denom`` is 0 up to the pseudo-inverse cut-off.

    With damping every entry is positive (the damped factors are definite) and none
    is cut: a preconditioner with a null space would stall conjugate gradients there.
    """
    if damping > 0:  # positive but for directions eigh could not resolve at all
        return torch.where(denom > 0, 1.0 / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.0)
    if denom.numel() == 0:
        return denom
    cut = default_rcond(None, denom.numel(), precision or denom.dtype) * denom.max().clamp_min(0)
    safe = torch.where(denom > cut, denom, torch.ones_like(denom))
    return torch.where(denom > cut, 1.0 / safe, torch.zeros_like(denom))


def _map(
    pair: KronPair,
    v: Tensor,
    fn: Callable[[str, Tensor], Tensor],
    rest_fn: Callable[[Tensor], Tensor],
) -> Tensor:
    out = torch.empty_like(v)
    for g, spec in pair.groups.items():
        spec.scatter(pair.layout, fn(g, spec.gather(pair.layout, v)), out)
    if pair._rest_index.numel():
        out[pair._rest_index] = rest_fn(v[pair._rest_index])
    return out
