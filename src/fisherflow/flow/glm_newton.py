"""One batch of a GLM stream, assimilated by penalised Fisher scoring with step-halving.

Assumed-density filtering (Opper 1998, *A Bayesian approach to on-line learning*)
or Laplace propagation (Smola, Vishwanathan & Eskin 2004): the stream's state after
``t`` batches is the Gaussian ``N(θ_t, I_t⁻¹)``; batch ``t+1`` moves the estimate to

    θ_{t+1} = argmax_θ  ℓ_B(θ) - ½ (θ - θ_t)ᵀ I_t (θ - θ_t),

and adds the batch information at the new estimate, ``I_{t+1} = I_t + J_B(θ_{t+1})``.
The maximisation is Fisher scoring on the penalised objective (for canonical links,
Newton's method), from ``θ_t``, with R's ``glm.fit`` step-halving (a step that leaves
the valid region — an overflowing or out-of-range mean — or lowers the objective is
halved; Marschner 2011, *glm2: fitting generalized linear models with convergence
problems*). With a gaussian identity model one step is exact (recursive least squares).

Functions here are pure: they read tensors and return tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fisherflow.flow._common import flat_layout
from fisherflow.flow.families import Family
from fisherflow.flow.glm_input import GLMBatch
from fisherflow.matrices import Dense

__all__ = [
    "MAX_HALVINGS",
    "Maximised",
    "batch_objective",
    "data_start",
    "maximise_batch",
    "pinv_solve_dense",
]

#: Step-halvings tried before a Fisher-scoring iteration gives up (R's glm.fit: maxit).
MAX_HALVINGS = 40


def pinv_solve_dense(H: Tensor, g: Tensor) -> Tensor:
    """``H⁺ g`` for a symmetric PSD ``H``, on the Jacobi-scaled matrix.

    A Cholesky solve of ``S H S`` (``S = diag(H)^{-1/2}``) when it succeeds — the
    common, full-rank case, about a hundred times faster than an eigendecomposition
    for small ``p`` — otherwise :meth:`Dense.pinv_solve` (the flow's pseudo-inverse
    cut-off), which leaves directions without information untouched.
    """
    H = 0.5 * (H + H.T)
    d = H.diagonal()
    if bool((d > 0).all()):
        s = d.rsqrt()
        L, info = torch.linalg.cholesky_ex(H * s[:, None] * s[None, :])
        if int(info) == 0:
            # a numerically singular H still factors: check the factor's conditioning
            ld = L.diagonal()
            if float(ld.min()) > 1e-7 * float(ld.max()):
                x = torch.cholesky_solve((g * s)[:, None], L)[:, 0]
                return x * s
    return Dense(H, flat_layout(H.shape[0])).pinv_solve(g)  # type: ignore[return-value]


def _evaluate(
    family: Family, b: GLMBatch, theta: Tensor, center: Tensor, info: Tensor | None
) -> tuple[float, Tensor, Tensor]:
    """``(objective, η, μ)`` at ``θ``; the objective is ``-inf`` where the mean is invalid."""
    eta = b.X @ theta if b.offset is None else b.X @ theta + b.offset
    link = family.link
    if not bool((torch.isfinite(eta) & link.valid(eta)).all()):
        return -math.inf, eta, eta
    mu = link.inverse(eta)
    if not bool((torch.isfinite(mu) & family.valid_mean(mu)).all()):
        return -math.inf, eta, mu
    ll = float((b.w * family.loglik(b.y, mu)).sum())
    if info is not None:
        d = theta - center
        ll -= 0.5 * float(d @ (info @ d))
    return (ll if math.isfinite(ll) else -math.inf), eta, mu


def batch_objective(
    family: Family, b: GLMBatch, theta: Tensor, center: Tensor, info: Tensor | None
) -> float:
    """``ℓ_B(θ) - ½ (θ - c)ᵀ I (θ - c)`` at unit dispersion; ``-inf`` where invalid.

    Example:
        >>> from fisherflow.flow.families import FAMILIES
        >>> X = torch.ones(2, 1, dtype=torch.float64); y = torch.tensor([0.0, 1.0], dtype=X.dtype)
        >>> b = GLMBatch(X, y, torch.ones(2, dtype=X.dtype), torch.ones(2, dtype=X.dtype), ["c"])
        >>> round(batch_objective(FAMILIES["bernoulli"], b, torch.zeros(1, dtype=X.dtype),
        ...                       torch.zeros(1, dtype=X.dtype), None), 6)  # 2 log(1/2)
        -1.386294
    """
    return _evaluate(family, b, theta, center, info)[0]


def _score_information(
    family: Family, b: GLMBatch, eta: Tensor, mu: Tensor
) -> tuple[Tensor, Tensor]:
    """Batch score and expected information from ``η`` and ``μ`` (as ``glm_score_information``)."""
    dmu = family.link.deriv(eta)
    var = family.variance(mu)
    U = b.X.T @ (b.w * (b.y - mu) * dmu / var)
    J = (b.X * (b.w * dmu**2 / var)[:, None]).T @ b.X
    return U, 0.5 * (J + J.T)


def data_start(family: Family, b: GLMBatch, center: Tensor, info: Tensor | None) -> Tensor:
    """One penalised weighted-least-squares step from a mean read off the data.

    With ``μ₀`` from :meth:`Family.start_mean`, ``η₀ = g(μ₀)``, working response
    ``z = η₀ - offset + (y - μ₀)/h'(η₀)`` and weights ``W = w h'(η₀)²/V(μ₀)``, returns
    ``(XᵀWX + I)⁺ (XᵀWz + I c)`` — the first iteration of IRLS (McCullagh & Nelder
    1989, §2.5), which needs no valid coefficients to start from.
    """
    mu0 = family.start_mean(b.y, b.w)
    eta0 = family.link.link(mu0)
    dmu = family.link.deriv(eta0)
    z = eta0 + (b.y - mu0) / dmu
    if b.offset is not None:
        z = z - b.offset
    W = b.w * dmu**2 / family.variance(mu0)
    H = (b.X * W[:, None]).T @ b.X
    g = b.X.T @ (W * z)
    if info is not None:
        H, g = H + info, g + info @ center
    return pinv_solve_dense(H, g)


@dataclass
class Maximised:
    """Result of :func:`maximise_batch`.

    Attributes:
        theta: The maximiser (the start when nothing valid was found).
        objective: Penalised objective there (``-inf`` if no valid point was found).
        n_iter: Fisher-scoring iterations run.
        converged: Whether the tolerance was met.
        valid: Whether a coefficient vector with a valid mean on the batch was found.
        information: The batch's expected information at ``theta`` (``None`` if not valid).
    """

    theta: Tensor
    objective: float
    n_iter: int
    converged: bool
    valid: bool
    information: Tensor | None = None


def _intercept_start(family: Family, b: GLMBatch) -> Tensor | None:
    """``θ = g(ȳ)`` on the constant column, 0 elsewhere: a constant mean, valid for every family."""
    const = (b.X == 1).all(dim=0).nonzero()
    if const.numel() == 0:
        return None
    ybar = (b.w * b.y).sum() / b.w.sum().clamp_min(1e-300)
    mu = family.start_mean(ybar.reshape(1), torch.ones(1, dtype=b.y.dtype))
    theta = torch.zeros(b.X.shape[1], dtype=b.X.dtype)
    theta[int(const[0, 0])] = family.link.link(mu)[0]
    return theta


def _start(
    family: Family, b: GLMBatch, center: Tensor, info: Tensor | None, start: Tensor | None
) -> tuple[Tensor, float]:
    """A valid start on the batch, the best of several.

    ``start`` (default: the prior mean) when it is valid and there is a prior;
    otherwise the best valid one of: ``start``, the prior mean, the data start with
    and without the prior, a constant mean (``g(ȳ)`` on the intercept), and the prior
    mean shrunk towards 0. The valid region of the inverse and identity links
    (``η > 0`` on every row) is convex, so Fisher scoring with step-halving stays in it
    from any valid start.
    """
    first = center if start is None else start
    f = batch_objective(family, b, first, center, info)
    fresh = info is None or not bool(info.abs().sum() > 0)
    if math.isfinite(f) and not fresh:
        return first, f
    best, fb = first, f
    candidates = [data_start(family, b, center, info), _intercept_start(family, b)]
    if start is not None:
        candidates.append(center)
    if info is not None:
        candidates.append(data_start(family, b, center, None))
    for cand in candidates:
        if cand is None or not bool(torch.isfinite(cand).all()):
            continue
        fc = batch_objective(family, b, cand, center, info)
        if fc > fb:
            best, fb = cand, fc
    if math.isfinite(fb):
        return best, fb
    for k in range(1, MAX_HALVINGS):  # shrink towards 0 (valid for log/logit links)
        cand = center * 0.5**k
        fc = batch_objective(family, b, cand, center, info)
        if math.isfinite(fc):
            return cand, fc
    return center, -math.inf


def maximise_batch(
    family: Family,
    b: GLMBatch,
    center: Tensor,
    info: Tensor | None,
    max_iter: int = 25,
    tol: float = 1e-8,
    decrement: float = 1e-8,
    start: Tensor | None = None,
) -> Maximised:
    """Maximise ``ℓ_B(θ) - ½ (θ - c)ᵀ I (θ - c)`` by Fisher scoring with step-halving.

    Args:
        family: The family.
        b: The batch.
        center: ``c``, the current estimate (prior mean).
        info: ``I`` as a dense ``(p, p)`` tensor (the prior information), or ``None``.
        max_iter: Most scoring iterations (each one pass over the batch).
        tol: Stop when the objective changes by less than ``tol (|f| + 0.1)`` (R's
            ``glm.control`` criterion and default) or every step is below
            ``tol (1 + |θ|)``.
        decrement: Also stop, before stepping, when the Newton decrement ``gᵀH⁻¹g``
            (the squared step length in standard errors of the updated estimate) is
            at most this.
        start: Where Fisher scoring starts when it gives a valid mean (default: the
            prior mean ``c``; a fixed-lag window starts from its last estimate).

    Returns:
        A :class:`Maximised`.

    Example:
        >>> from fisherflow.flow.families import FAMILIES
        >>> X = torch.ones(4, 1, dtype=torch.float64)
        >>> y = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=X.dtype)
        >>> one = torch.ones(4, dtype=X.dtype)
        >>> m = maximise_batch(FAMILIES["bernoulli"], GLMBatch(X, y, one, one, ["c"]),
        ...                    torch.zeros(1, dtype=X.dtype), None)
        >>> round(m.theta.item(), 4), round(math.log(3), 4), m.converged  # logit(3/4)
        (1.0986, 1.0986, True)
    """
    theta, f = _start(family, b, center, info, start)
    if not math.isfinite(f):
        return Maximised(center, f, 0, False, False)
    _, eta, mu = _evaluate(family, b, theta, center, info)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        U, J = _score_information(family, b, eta, mu)
        if info is not None:
            U, J = U - info @ (theta - center), J + info
        step = pinv_solve_dense(J, U)
        if not bool(torch.isfinite(step).all()):
            break
        if float(U @ step) <= decrement:  # the step is below 1e-4 posterior standard errors
            converged = True
            break
        f_new, cand, eta_c, mu_c = -math.inf, theta, eta, mu
        for _ in range(MAX_HALVINGS):
            cand = theta + step
            f_new, eta_c, mu_c = _evaluate(family, b, cand, center, info)
            if f_new >= f - 1e-12 * (abs(f) + 1):
                break
            step = step / 2
        else:
            converged = True  # no ascent direction left at machine precision
            break
        small = bool((step.abs() <= tol * (1 + theta.abs())).all())
        flat = abs(f_new - f) <= tol * (abs(f_new) + 0.1)
        theta, f, eta, mu = cand, f_new, eta_c, mu_c
        if small or flat:
            converged = True
            break
    return Maximised(theta, f, it, converged, True, _score_information(family, b, eta, mu)[1])
