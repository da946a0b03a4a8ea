"""Solving with a weighted sum of Fisher matrices: ``(Σ wᵢFᵢ + λI) x = b``.

Dense, diagonal and block matrices add exactly (their ``+``), so the sum is formed
and solved in its structure. K-FAC, EKFAC and low-rank do not: ``G₁⊗A₁ + G₂⊗A₂`` is
not a Kronecker product and a sum of low-rank factors outgrows its rank. For them
the *exact* sum is applied matrix-free (each ``Fᵢ.mv`` in its own structure, per
layer: never a P×P matrix) inside preconditioned conjugate gradients (CG), with a
preconditioner that is exact or close to it, so CG converges in one step when it is
exact and in a few otherwise:

* K-FAC — the exact solve of a sum of *two* Kronecker products by simultaneous
  diagonalisation (:class:`fisherflow.apps._kron_solve.KronPair`), of the model with
  the largest Fisher mass ``wᵢ tr Fᵢ`` and the factor-wise sum of the others (the
  default for two models; for more, the factor-wise sum, which needed fewer steps on
  real Fishers, see ``bench/RESULTS_merge.md``). For two
  models without damping that solve *is* the answer (no CG; its pseudo-inverse
  cut-off is ``size · eps`` of the dtype the factors were accumulated in, so the
  float32 rounding noise of singular factors is not inverted into huge steps); with
  damping λ each of the two terms takes λ/2 through its factors (factored Tikhonov
  damping, an upper bound of the damped sum) and CG corrects the rest. The factors
  are first projected onto the PSD cone (negative eigenvalues from float32
  rounding set to 0: otherwise a small λ leaves the sum indefinite and CG breaks
  down);
* EKFAC, low-rank — the structure's own approximate ``+`` (EKFAC's sum in a fixed
  basis, low-rank's concatenation).

CG is written by hand because scipy's ``cg`` works on float64 numpy arrays on the
CPU only and the matrices here may live on a GPU.

Reference: Hestenes & Stiefel (1952); Saad (2003), *Iterative Methods for Sparse
Linear Systems*, alg. 9.1 (preconditioned CG).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor

from fisherflow.apps._kron_cg import layer_cg, layer_operator, single_layer
from fisherflow.apps._kron_solve import KronPair, negative_part, psd_factors
from fisherflow.estimation.data import warn_user
from fisherflow.matrices import KFAC, FisherMatrix

__all__ = ["EXACT_SUM", "PRECONDITIONERS", "ConvergenceNotice", "weighted_solve"]

#: Structures whose ``+`` is exact, so a weighted sum is solved in its structure.
EXACT_SUM = frozenset({"dense", "diagonal", "block"})


class ConvergenceNotice(UserWarning):
    """Conjugate gradients stopped at ``max_iter`` before reaching its tolerance."""


def weighted_sum(fishers: Sequence[FisherMatrix], weights: Sequence[float]) -> FisherMatrix:
    """``Σ wᵢ Fᵢ`` with the structure's own ``+`` (exact only for :data:`EXACT_SUM`)."""
    total = weights[0] * fishers[0]
    for w, F in zip(weights[1:], fishers[1:], strict=True):
        total = total + w * F
    return total


def weighted_solve(
    fishers: Sequence[FisherMatrix],
    weights: Sequence[float],
    rhs: Tensor,
    damping: float = 0.0,
    *,
    tol: float = 1e-8,
    max_iter: int = 1000,
    info: dict[str, int] | None = None,
    preconditioner: str = "auto",
) -> Tensor:
    """``(Σ wᵢFᵢ + λI)⁺ b`` for a flat ``(P,)`` right-hand side in the Fishers' layout.

    Args:
        fishers: Matrices over one layout and structure.
        weights: One weight ``>= 0`` per matrix.
        rhs: ``b``, flat ``(P,)``, in the range of the sum (as ``Σ wᵢFᵢ vᵢ`` is).
        damping: λ >= 0.
        tol: Relative residual at which conjugate gradients stops.
        max_iter: Most conjugate-gradient steps (a :class:`ConvergenceNotice` if hit).
        preconditioner: For K-FAC, ``"pair"`` (the two-term solve), ``"sum"`` (the
            factor-wise sum, as for the other structures) or ``"auto"``: ``"pair"``
            for two matrices, ``"sum"`` for more (on the MNIST Fishers of
            ``bench/bench_merge.py`` the pair needed more steps with three models).
        info: If given, ``info["iterations"]`` is set to the conjugate-gradient steps
            taken (0 for the direct solve).

    Returns:
        The flat solution in ``rhs``'s dtype: the iterate with the smallest residual
        (on a singular sum, rounding can make later iterates drift away). Conjugate
        gradients runs in float64 whatever the inputs' dtype (float32 stalls far above
        the tolerance).

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"w": (2,)})
        >>> Fs = [Diagonal(torch.tensor([1.0, 2.0]), lay), Diagonal(torch.tensor([3.0, 2.0]), lay)]
        >>> weighted_solve(Fs, [1.0, 1.0], torch.tensor([8.0, 8.0])).tolist()
        [2.0, 2.0]
    """
    if info is not None:
        info["iterations"] = 0
    if fishers[0].structure in EXACT_SUM or len(fishers) == 1:
        exact = weighted_sum(fishers, weights)
        return cast(Tensor, exact.pinv_solve(rhs, damping=damping)).to(rhs.dtype)
    precision = max((F.dtype for F in fishers), key=lambda t: torch.finfo(t).eps)
    if preconditioner not in (*PRECONDITIONERS, "auto"):
        raise ValueError(
            f"preconditioner must be one of {sorted([*PRECONDITIONERS, 'auto'])}, "
            f"got {preconditioner!r}"
        )
    if preconditioner == "auto":
        preconditioner = "pair" if len(fishers) == 2 else "sum"
    pair = fishers[0].structure == "kfac" and preconditioner == "pair"
    layer = single_layer(fishers) if pair else None
    direct = pair and len(fishers) == 2 and damping == 0.0
    if layer is not None and not direct and _definite(fishers, weights, damping, layer):
        # one layer whose damped sum is definite as it is: no projection, no copies
        # of the factors (they are read in their dtype, a block at a time)
        return _layer_solve(fishers, weights, damping, precision, layer, rhs, tol, max_iter, info)
    if fishers[0].structure == "kfac":  # one float64 copy at a time, projected in place
        fishers = [_float64_psd(cast(KFAC, F)) for F in fishers]
    else:
        fishers = [F.to(dtype=torch.float64) if F.dtype != torch.float64 else F for F in fishers]
    if layer is not None and not direct:
        return _layer_solve(fishers, weights, damping, precision, layer, rhs, tol, max_iter, info)
    precondition = PRECONDITIONERS["pair" if pair else "sum"](fishers, weights, damping, precision)

    def apply(v: Tensor) -> Tensor:
        out = damping * v
        for w, F in zip(weights, fishers, strict=True):
            out = out + w * cast(Tensor, F.mv(v))
        return out

    b = rhs.to(torch.float64)
    norm_b = float(b.norm())
    if norm_b == 0.0:
        return torch.zeros_like(rhs)
    if direct:
        # the direct solve: exact, with the pseudo-inverse cut-off at the precision the
        # factors were accumulated in (CG cannot improve on it: what is left of the
        # residual lies in directions that cut-off calls rounding noise)
        return precondition(b).to(rhs.dtype)
    x = torch.zeros_like(b)
    r = b.clone()
    best_x, best_r = x, float(r.norm())  # rounding can make CG diverge on a singular sum
    z = precondition(r)
    p = z.clone()
    rz = torch.dot(r, z)
    for step in range(1, max_iter + 1):
        if info is not None:
            info["iterations"] = step
        q = apply(p)
        pq = torch.dot(p, q)
        if float(pq) <= 0.0:  # no curvature left along p: converged in the range
            break
        alpha = rz / pq
        x = x + alpha * p
        r = r - alpha * q
        res = float(r.norm())
        if res < best_r:
            best_x, best_r = x, res
        if res <= tol * norm_b:
            break
        z = precondition(r)
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    else:
        warn_user(
            f"conjugate gradients stopped after {max_iter} steps at relative residual "
            f"{best_r / norm_b:.2e} (tolerance {tol:g}); add damping",
            ConvergenceNotice,
        )
    return best_x.to(rhs.dtype)


def pair_solver(
    fishers: Sequence[FisherMatrix],
    weights: Sequence[float],
    damping: float,
    precision: torch.dtype,
    dtype: torch.dtype | None = None,
) -> KronPair:
    """K-FAC: the two-term solve of the heaviest model and the sum of the others.

    Two models enter with their weights as scales (no scaled copies of the factors);
    with more, the others' factor-wise sum is formed.
    """
    masses = [w * float(F.trace()) for w, F in zip(weights, fishers, strict=True)]
    top = max(range(len(fishers)), key=lambda i: masses[i])
    others = [i for i in range(len(fishers)) if i != top]
    if len(others) == 1:
        second, scale = fishers[others[0]], weights[others[0]]
    else:
        second = weighted_sum([fishers[i] for i in others], [weights[i] for i in others])
        scale = 1.0
    return KronPair(
        cast(KFAC, fishers[top]),
        cast(KFAC, second),
        damping,
        precision,
        scales=(weights[top], scale),
        dtype=dtype,
    )


def _pair(
    fishers: Sequence[FisherMatrix],
    weights: Sequence[float],
    damping: float,
    precision: torch.dtype,
) -> Callable[[Tensor], Tensor]:
    """K-FAC: :func:`pair_solver`'s solve on flat vectors."""
    return pair_solver(fishers, weights, damping, precision).solve


def _float64_psd(fisher: KFAC) -> KFAC:
    """``fisher`` in float64 with PSD factors; a new copy is projected in place."""
    if fisher.dtype == torch.float64:
        return psd_factors(fisher)
    return psd_factors(cast(KFAC, fisher.to(dtype=torch.float64)), inplace=True)


def _definite(
    fishers: Sequence[FisherMatrix], weights: Sequence[float], damping: float, layer: str
) -> bool:
    """Whether ``Σ wᵢFᵢ + λI ⪰ λ/2 · I`` with the factors as they are (no projection).

    Float32 factors are PSD only up to rounding (see :func:`psd_factors`); when that
    indefiniteness is under half the damping, conjugate gradients needs no projection.
    """
    if damping <= 0:
        return False
    kfacs = [cast(KFAC, F) for F in fishers]
    neg = sum(
        w * negative_part(F.G[layer], F.A[layer]) for w, F in zip(weights, kfacs, strict=True)
    )
    return neg <= damping / 2


def _layer_solve(
    fishers: Sequence[FisherMatrix],
    weights: Sequence[float],
    damping: float,
    precision: torch.dtype,
    layer: str,
    rhs: Tensor,
    tol: float,
    max_iter: int,
    info: dict[str, int] | None,
) -> Tensor:
    """CG of one K-FAC layer on its matrix view, in float64 (:mod:`fisherflow.apps._kron_cg`)."""
    solver = pair_solver(fishers, weights, damping, precision, dtype=torch.float64)
    kfacs = [cast(KFAC, F) for F in fishers]
    apply_view = layer_operator(
        [F.G[layer] for F in kfacs], [F.A[layer] for F in kfacs], weights, damping
    )
    spec, layout = solver.groups[layer], solver.layout
    b = spec.gather(layout, rhs[:, None])[0].to(torch.float64, copy=True).contiguous()
    x, residual, converged = layer_cg(
        apply_view,
        lambda v, out, work: solver.solve_view_(layer, v, out, work),
        b,
        tol=tol,
        max_iter=max_iter,
        info=info,
    )
    if not converged:
        warn_user(
            f"conjugate gradients stopped after {max_iter} steps at relative residual "
            f"{residual:.2e} (tolerance {tol:g}); add damping",
            ConvergenceNotice,
        )
    out = rhs.new_empty(rhs.shape[0], 1)
    spec.scatter(layout, x[None].to(rhs.dtype), out)
    return out[:, 0]


def _sum(
    fishers: Sequence[FisherMatrix],
    weights: Sequence[float],
    damping: float,
    precision: torch.dtype,
) -> Callable[[Tensor], Tensor]:
    """The pseudo-inverse of the structure's own (approximate) ``Σ wᵢFᵢ``."""
    approx = weighted_sum(fishers, weights)
    return lambda r: cast(Tensor, approx.pinv_solve(r, damping=damping))


#: Preconditioners of :func:`weighted_solve` (``"pair"`` applies to K-FAC only).
PRECONDITIONERS: dict[
    str,
    Callable[
        [Sequence[FisherMatrix], Sequence[float], float, torch.dtype], Callable[[Tensor], Tensor]
    ],
] = {"pair": _pair, "sum": _sum}
