"""Conjugate gradients on one K-FAC layer's matrix view, in a fixed set of buffers.

A merge unit under K-FAC Fishers is one layer (its weight and bias), and the damped
system of :func:`fisherflow.apps._solve.weighted_solve` on it is

    Σᵢ wᵢ Gᵢ X Aᵢ + λ X = B

on the layer's ``(n_out, n_in + has_bias)`` matrix view ``X``
(:mod:`fisherflow.matrices.kron`). This is the preconditioned conjugate-gradient
method of that function (Saad, 2003, *Iterative Methods for Sparse Linear Systems*,
alg. 9.1; same steps, same stopping rule, the iterate with the smallest residual
returned), run on the view itself: no gather and scatter between the flat layout
and the view at every product, and every product and update written into one of
six or seven buffers of the layer's size (iterate, residual, preconditioned residual, direction,
product, scratch, and the best iterate if the residual ever rises) rather than a
new tensor per operation. On
the merge of ``bench/bench_merge.py`` that is what keeps the largest layer's solve
within the merge's memory target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fisherflow.matrices import KFAC, FisherMatrix

__all__ = ["layer_cg", "layer_operator", "single_layer"]

#: ``(x, out, work) ↦ out``: a product on a layer view into ``out`` (``work``: scratch).
ViewMap = Callable[[Tensor, Tensor, Tensor], Tensor]


def single_layer(fishers: Sequence[FisherMatrix]) -> str | None:
    """The layer name when every Fisher is K-FAC over exactly one layer and no rest.

    Example:
        >>> from fisherflow.matrices import KronGroup, ParamLayout
        >>> lay = ParamLayout.from_shapes({"w": (2, 3)})
        >>> F = KFAC({"l": KronGroup("w")}, {"l": torch.eye(3)}, {"l": torch.eye(2)}, lay)
        >>> single_layer([F, F])
        'l'
    """
    names: set[str] = set()
    for F in fishers:
        if not isinstance(F, KFAC) or len(F.kron_groups) != 1 or F.rest_names:
            return None
        names.update(F.kron_groups)
    return names.pop() if len(names) == 1 else None


def _left_into(G: Tensor, x: Tensor, out: Tensor, chunk: int) -> None:
    """``out = G x``; a factor of another dtype is converted a block of rows at a time."""
    if G.dim() == 1:
        torch.mul(x, G[:, None], out=out)
    elif G.dtype == x.dtype:
        torch.mm(G, x, out=out)
    else:
        for i in range(0, G.shape[0], chunk):
            torch.mm(G[i : i + chunk].to(x.dtype), x, out=out[i : i + chunk])


def _right_add(out: Tensor, y: Tensor, A: Tensor, w: float, chunk: int) -> None:
    """``out += w · y A``; a factor of another dtype is converted a block of columns at a time."""
    if A.dim() == 1:
        out.addcmul_(y, A, value=w)
    elif A.dtype == y.dtype:
        out.addmm_(y, A, alpha=w)
    else:
        for j in range(0, A.shape[1], chunk):
            out[:, j : j + chunk].addmm_(y, A[:, j : j + chunk].to(y.dtype), alpha=w)


def layer_operator(
    Gs: Sequence[Tensor],
    As: Sequence[Tensor],
    weights: Sequence[float],
    damping: float,
    chunk: int = 128,
) -> ViewMap:
    """``X ↦ Σᵢ wᵢ Gᵢ X Aᵢ + λX`` on ``(n_out, n_cols)`` views (1-D factors: diagonal).

    Factors in another dtype than the views (float32 factors, float64 iterates) are
    converted ``chunk`` rows or columns at a time, never whole: the products are
    those of the converted factors, and no converted copy outlives the product.

    Example:
        >>> apply = layer_operator([2 * torch.eye(2)], [torch.tensor([1.0, 3.0])], [0.5], 1.0)
        >>> x = torch.ones(2, 2)
        >>> apply(x, torch.empty(2, 2), torch.empty(2, 2)).tolist()  # 0.5·2·x·diag(1, 3) + x
        [[2.0, 4.0], [2.0, 4.0]]
    """

    def apply(x: Tensor, out: Tensor, work: Tensor) -> Tensor:
        out.copy_(x).mul_(damping)
        for w, G, A in zip(weights, Gs, As, strict=True):
            _left_into(G, x, work, chunk)
            _right_add(out, work, A, w, chunk)
        return out

    return apply


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def layer_cg(
    apply: ViewMap,
    precondition: ViewMap,
    b: Tensor,
    *,
    tol: float,
    max_iter: int,
    info: dict[str, int] | None = None,
) -> tuple[Tensor, float, bool]:
    """Preconditioned conjugate gradients for ``K x = b`` on a layer view.

    Args:
        apply: ``K`` (symmetric positive semi-definite), as :data:`ViewMap`.
        precondition: An approximate ``K⁻¹`` (symmetric positive definite).
        b: The right-hand side view, contiguous; it becomes the residual buffer (the
            caller hands it over).
        tol: Relative residual at which to stop.
        max_iter: Most steps.
        info: If given, ``info["iterations"]`` is set to the steps taken.

    Returns:
        ``(x with the smallest residual, that residual / ‖b‖, whether it met tol)``.

    Example:
        >>> apply = layer_operator([torch.tensor([1.0, 4.0])], [torch.ones(1)], [1.0], 0.0)
        >>> exact = lambda x, out, work: torch.div(x, torch.tensor([[1.0], [4.0]]), out=out)
        >>> x, res, ok = layer_cg(apply, exact, torch.tensor([[2.0], [8.0]]), tol=1e-12,
        ...                       max_iter=5)
        >>> x.tolist(), ok
        ([[2.0], [2.0]], True)
    """
    r = b
    norm_b = float(r.norm())
    x = torch.zeros_like(r)
    if norm_b == 0.0:
        return x, 0.0, True
    # the best iterate is x itself while the residual keeps falling; the buffer is
    # allocated (x − αp, the iterate before a rise) only if the residual ever rises
    best: Tensor | None = None
    best_is_x, best_r = True, norm_b
    z, q, work = torch.empty_like(r), torch.empty_like(r), torch.empty_like(r)
    precondition(r, z, work)
    p = z.clone()
    rz = _dot(r, z)
    converged = False
    for step in range(1, max_iter + 1):
        if info is not None:
            info["iterations"] = step
        apply(p, q, work)
        pq = _dot(p, q)
        if pq <= 0.0:  # no curvature left along p: converged in the range
            converged = True
            break
        alpha = rz / pq
        x.add_(p, alpha=alpha)
        r.sub_(q, alpha=alpha)
        res = float(r.norm())
        if res < best_r:
            best_is_x, best_r = True, res
        elif best_is_x:
            best = torch.sub(x, p, alpha=alpha, out=best) if best is not None else x - alpha * p
            best_is_x = False
        if res <= tol * norm_b:
            converged = True
            break
        precondition(r, z, work)
        rz_new = _dot(r, z)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    out = x if best_is_x or best is None else best
    return out, best_r / norm_b, converged
