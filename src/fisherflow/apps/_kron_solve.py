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

import numpy as np
import torch
from torch import Tensor

from fisherflow.matrices import KFAC
from fisherflow.matrices.kron import left, right
from fisherflow.matrices.linalg import default_rcond, eigh

__all__ = [
    "KronPair",
    "damping_shifts",
    "factored_damping",
    "negative_part",
    "psd_factors",
    "simultaneous_basis",
]


def _eigh(matrix: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric matrix with little work memory (``overwrite``: its scratch).

    On the CPU, LAPACK's ``syevr`` through scipy (the relatively robust
    representations algorithm, workspace O(n)) instead of torch's ``syevd`` (workspace
    2n² + O(n) entries, plus a symmetrised copy in :func:`~fisherflow.matrices.linalg.eigh`):
    with ``overwrite`` the input is the only n² buffer besides the eigenvectors. Only
    the lower triangle is read. Elsewhere, or if scipy fails, the shared ``eigh``.
    """
    if matrix.device.type == "cpu" and matrix.dtype in (torch.float32, torch.float64):
        import scipy.linalg

        array = matrix.numpy()
        if array.flags.c_contiguous:  # its transpose (the same symmetric matrix) is
            array = array.T  # Fortran-ordered, which LAPACK can overwrite without a copy
        try:
            vals, vecs = scipy.linalg.eigh(
                array, overwrite_a=overwrite, check_finite=False, driver="evr"
            )
            return torch.from_numpy(vals), torch.from_numpy(vecs)
        except (np.linalg.LinAlgError, ValueError) as err:
            if overwrite:  # the input may be partly overwritten: no second try on it
                raise ValueError(f"symmetric eigendecomposition failed: {err}") from err
    return eigh(matrix)


def _congruence(W: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """``Wᵀ b W`` in ``W``'s dtype, a block of ``b``'s rows at a time (no ``(n, k)`` temporary)."""
    k = W.shape[1]
    out = W.new_zeros(k, k)
    for i in range(0, b.shape[0], chunk):
        out.addmm_(W[i : i + chunk].T, b[i : i + chunk].to(W.dtype) @ W)
    return out


def _right_multiply_(W: Tensor, R: Tensor, chunk: int = 256) -> Tensor:
    """``W ← W R`` in place, a block of rows at a time."""
    for i in range(0, W.shape[0], chunk):
        W[i : i + chunk] = W[i : i + chunk] @ R
    return W


def simultaneous_basis(
    b1: Tensor,
    b2: Tensor,
    precision: torch.dtype | None = None,
    *,
    scales: tuple[float, float] = (1.0, 1.0),
    shifts: tuple[float, float] = (0.0, 0.0),
    dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """An invertible ``S`` with ``Sᵀ B₁ S = diag(d₁)`` and ``Sᵀ B₂ S = diag(d₂)``.

    ``Bᵢ = cᵢ bᵢ + σᵢ I`` (``scales`` c, ``shifts`` σ; never formed), with ``bᵢ``
    symmetric PSD, square or 1-D (a diagonal matrix). The basis is built on the range
    of ``B₁/tr B₁ + B₂/tr B₂`` (whitened, then the eigenvectors of the whitened
    ``B₁``) and completed with an orthonormal basis of its null space, where both
    ``d`` are 0. Besides the inputs it holds about two ``n × n`` buffers at a time.
    Reference: Golub & Van Loan (2013), §8.7.2.

    Args:
        b1: First matrix, ``(n, n)`` or diagonal ``(n,)``.
        b2: Second matrix, same size.
        precision: The dtype the matrices were accumulated in (default: theirs);
            eigenvalues of the sum below ``n · eps(precision)`` times the largest are
            rounding noise and count as its null space.
        scales: ``(c₁, c₂) >= 0``.
        shifts: ``(σ₁, σ₂) >= 0``.
        dtype: The dtype to compute and return in (default: ``b1``'s); the inputs
            are read in theirs and never copied whole.

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
    (c1, c2), (h1, h2) = scales, shifts
    dtype = dtype or b1.dtype
    if b1.dim() == 1 and b2.dim() == 1:
        d1, d2 = b1.to(dtype).clamp_min(0), b2.to(dtype).clamp_min(0)
        return None, d1.mul_(c1).add_(h1), d2.mul_(c2).add_(h2)
    m1 = torch.diag(b1.to(dtype)) if b1.dim() == 1 else b1
    m2 = torch.diag(b2.to(dtype)) if b2.dim() == 1 else b2
    n = m1.shape[0]
    t1 = c1 * float(m1.diagonal().sum(dtype=torch.float64)) + n * h1
    t2 = c2 * float(m2.diagonal().sum(dtype=torch.float64)) + n * h2
    s1 = 1.0 / t1 if t1 > 0 else 0.0
    s2 = 1.0 / t2 if t2 > 0 else 0.0
    if s1 == 0.0 and s2 == 0.0:
        zero = m1.new_zeros(n, dtype=dtype)
        return torch.eye(n, dtype=dtype, device=m1.device), zero, zero.clone()
    total = m1.to(dtype, copy=True).mul_(s1 * c1)
    total.add_(m2, alpha=s2 * c2).diagonal().add_(s1 * h1 + s2 * h2)
    vals, vecs = _eigh(total, overwrite=True)
    del total
    keep = vals > default_rcond(None, n, precision or vals.dtype) * vals.max().clamp_min(0)
    null = None
    if bool(keep.all()):
        whiten = vecs.div_(vals.sqrt())
    else:
        null, whiten = vecs[:, ~keep], vecs[:, keep] / vals[keep].sqrt()
    del vecs
    # Wᵀ(s₁B₁)W = s₁c₁ Wᵀb₁W + s₁σ₁ WᵀW, and WᵀW = diag(1 / vals) (orthonormal V)
    inner = _congruence(whiten, m1).mul_(s1 * c1)
    inner.diagonal().add_(s1 * h1 / vals[keep])
    mu, rot = _eigh(inner, overwrite=True)
    del inner
    mu = mu.to(dtype).clamp_(0.0, 1.0)
    S = _right_multiply_(whiten, rot.to(dtype))
    del rot
    if null is not None:
        S = torch.cat([S, null], dim=1)
    pad = mu.new_zeros(n - mu.numel())
    d1 = torch.cat([mu / s1 if s1 else torch.zeros_like(mu), pad])
    d2 = torch.cat([(1.0 - mu) / s2 if s2 else torch.zeros_like(mu), pad])
    return S, d1, d2


def psd_factors(fisher: KFAC, inplace: bool = False) -> KFAC:
    """``fisher`` with each factor's negative eigenvalues set to 0 (itself if none).

    Factors accumulated in float32 are PSD only up to rounding; a slightly indefinite
    ``G ⊗ A`` makes ``Σ wᵢFᵢ + λI`` indefinite for small λ, and conjugate gradients
    then breaks down (a step with ``pᵀKp <= 0``) far from the solution. A projected
    factor is ``(V√Λ₊)(V√Λ₊)ᵀ``; with ``inplace`` (for a Fisher the caller owns) it is
    written over the factor, else into a new one.
    """
    changed = False

    def project(factor: Tensor) -> Tensor:
        nonlocal changed
        if factor.dim() == 1:
            if bool((factor < 0).any()):
                changed = True
                return factor.clamp_min_(0) if inplace else factor.clamp_min(0)
            return factor
        vals, vecs = _eigh(factor, overwrite=inplace)  # in place: the factor is scratch
        if not inplace and not bool((vals < 0).any()):
            return factor
        changed = True
        root = vecs.mul_(vals.clamp_min(0).sqrt().to(vecs.dtype)).to(factor.dtype)
        del vecs
        return torch.mm(root, root.T, out=factor) if inplace else root @ root.T

    A = {g: project(f) for g, f in fisher.A.items()}
    G = {g: project(f) for g, f in fisher.G.items()}
    if not changed and not bool((fisher.rest < 0).any()):
        return fisher
    rest = fisher.rest.clamp_min_(0) if inplace else fisher.rest.clamp_min(0)
    return KFAC(fisher.kron_groups, A, G, fisher.layout, rest, **fisher.meta)


def negative_part(G: Tensor, A: Tensor) -> float:
    """A bound ``ν >= 0`` with ``G ⊗ A ⪰ −ν I`` for symmetric factors (2-D or 1-D).

    The eigenvalues of ``G ⊗ A`` are the products ``gⱼaₖ`` of the factors' (computed
    in float64), so ``ν = g⁻a⁺ + g⁺a⁻`` with ``x⁻ = max(0, −min x)`` and
    ``x⁺ = max(0, max x)`` (Horn & Johnson, 1991, *Topics in Matrix Analysis*,
    thm. 4.2.12). 0 for PSD factors.

    Example:
        >>> negative_part(torch.tensor([2.0, -0.5]), torch.tensor([3.0, 1.0]))  # 0.5 · 3
        1.5
    """

    def extremes(factor: Tensor) -> tuple[float, float]:
        if factor.dim() == 1:
            vals = factor.to(torch.float64)
        else:
            vals = _eigvalsh(factor.to(torch.float64, copy=True))
        return max(0.0, -float(vals.min())), max(0.0, float(vals.max()))

    (g_neg, g_pos), (a_neg, a_pos) = extremes(G), extremes(A)
    return g_neg * a_pos + g_pos * a_neg


def _eigvalsh(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric matrix this function may overwrite (scipy on the CPU)."""
    if matrix.device.type == "cpu":
        import scipy.linalg

        array = matrix.numpy()
        array = array.T if array.flags.c_contiguous else array
        try:
            return torch.from_numpy(
                scipy.linalg.eigh(
                    array, eigvals_only=True, overwrite_a=True, check_finite=False, driver="evr"
                )
            )
        except (np.linalg.LinAlgError, ValueError) as err:
            raise ValueError(f"symmetric eigenvalues failed: {err}") from err
    return torch.linalg.eigvalsh(matrix)


def damping_shifts(G: Tensor, A: Tensor, lam: float, scale: float = 1.0) -> tuple[float, float]:
    """``(γ, α)``: ``γα = lam``, ``α/γ = π²`` for ``scale·G`` and ``A`` (Martens & Grosse, §6.3).

    ``π² = (tr A / n_A) / (tr scale·G / n_G)`` (1 when a trace is 0); factors may be
    1-D (diagonal). ``lam = 0`` gives ``(0, 0)``.

    Example:
        >>> damping_shifts(torch.eye(2), 4 * torch.eye(3), 4.0)  # π = 2
        (1.0, 4.0)
    """
    if lam <= 0:
        return 0.0, 0.0
    mean_g = scale * float(G.sum() if G.dim() == 1 else G.diagonal().sum()) / G.shape[0]
    mean_a = float(A.sum() if A.dim() == 1 else A.diagonal().sum()) / A.shape[0]
    pi = math.sqrt(mean_a / mean_g) if mean_g > 0 and mean_a > 0 else 1.0
    return math.sqrt(lam) / pi, math.sqrt(lam) * pi


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
    gamma, alpha = damping_shifts(G, A, lam)
    return _shift(G, gamma), _shift(A, alpha)


def _shift(factor: Tensor, value: float) -> Tensor:
    if factor.dim() == 1:
        return factor + value
    out = factor.clone()
    out.diagonal().add_(value)
    return out


class KronPair:
    """``(P₁ + P₂)⁺`` for two K-FAC matrices over one layout; damped, an approximation.

    ``Pᵢ = cᵢ Fᵢ`` (``scales``; the scaled factors are never formed). Per layer the
    bases of the module docstring are computed once; the rest parameters (a diagonal)
    add exactly, damping included.

    Args:
        first: ``F₁``.
        second: ``F₂``, same layout and layer groups.
        damping: λ >= 0; with λ > 0 the inverse of the factored-damping pair of the
            module docstring (``⪰ P₁ + P₂ + λI``), exact only at λ = 0.
        precision: The dtype the factors were accumulated in (default: theirs): the
            pseudo-inverse cut-offs are ``size · eps(precision)`` relative, so that
            float32 rounding noise in singular factors is not inverted.
        scales: ``(c₁, c₂) >= 0``, the weights of the two matrices.
        dtype: The dtype of the bases (default: the factors').

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
        scales: tuple[float, float] = (1.0, 1.0),
        dtype: torch.dtype | None = None,
    ) -> None:
        self.layout, self.groups = first.layout, first.kron_groups
        self.damping = damping
        self._bases: dict[str, tuple[Tensor | None, Tensor | None, Tensor]] = {}
        c1, c2 = scales
        for g in self.groups:
            gamma1, alpha1 = damping_shifts(first.G[g], first.A[g], damping / 2, c1)
            gamma2, alpha2 = damping_shifts(second.G[g], second.A[g], damping / 2, c2)
            # damped factors are definite: no cut-off (a cut direction would be a 0 here)
            cut = precision if damping == 0 else None
            SG, g1, g2 = simultaneous_basis(
                first.G[g], second.G[g], cut, scales=(c1, c2), shifts=(gamma1, gamma2), dtype=dtype
            )
            SA, a1, a2 = simultaneous_basis(
                first.A[g], second.A[g], cut, shifts=(alpha1, alpha2), dtype=dtype
            )
            denom = torch.outer(g1, a1).add_(torch.outer(g2, a2))
            self._bases[g] = (SG, SA, _reciprocal(denom, damping, precision))
            del denom
        rest = c1 * first.rest + c2 * second.rest + damping
        self._rest = _reciprocal(rest, damping, precision)
        self._rest_index = self.layout.indices(first.rest_names).to(first.rest.device)

    def _group_solve(self, g: str, x: Tensor) -> Tensor:
        SG, SA, inv = self._bases[g]
        y = right(left(None if SG is None else SG.T, x), SA) * inv
        return right(left(SG, y), None if SA is None else SA.T)

    def solve_view_(self, g: str, x: Tensor, out: Tensor, work: Tensor) -> Tensor:
        """The solve of layer ``g`` on one ``(n_out, n_cols)`` view, into ``out``.

        ``work`` is a scratch buffer of the same shape; nothing else is allocated
        (for the CG of :func:`fisherflow.apps._kron_cg.layer_cg`).
        """
        SG, SA, inv = self._bases[g]
        y = x if SG is None else torch.mm(SG.T, x, out=work)
        if SA is None:
            out.copy_(y)
        else:
            torch.mm(y, SA, out=out)
        out.mul_(inv)
        if SG is not None:
            torch.mm(SG, out, out=work)
            out.copy_(work)
        if SA is not None:
            torch.mm(out, SA.T, out=work)
            out.copy_(work)
        return out

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
