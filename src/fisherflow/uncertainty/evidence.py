"""The Laplace evidence (log marginal likelihood) and the prior precision that maximises it.

With a Gaussian prior ``N(0, D⁻¹)`` (``D`` = τₖ on layer ``k``), a posterior mode θ*
and the posterior precision ``P = F / T + D``,

    log p(D) ≈ log p(D | θ*) + log N(θ*; 0, D⁻¹) + (P/2) log 2π − ½ log det P
             = log p(D | θ*) + Σₖ [½ Pₖ log τₖ − ½ τₖ ‖θₖ*‖²] − ½ log det P,

the Laplace approximation at a fixed θ* (MacKay, 1992, "A practical Bayesian framework
for backpropagation networks"; Immer et al. (2021), "Scalable marginal likelihood
estimation for model selection in deep learning", ICML). For a linear model with a
Gaussian likelihood and the exact Fisher it is the exact evidence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

__all__ = ["log_evidence", "maximise_evidence"]


def log_evidence(
    loglik: float | Tensor,
    theta_sq: Tensor,
    sizes: Sequence[int],
    prior_precision: Tensor,
    logdet_precision: Tensor,
) -> Tensor:
    """``log p(D | θ*) + Σₖ [½ Pₖ log τₖ − ½ τₖ ‖θₖ*‖²] − ½ log det P``.

    Args:
        loglik: ``log p(D | θ*)`` with every normalising constant (tempered).
        theta_sq: ``(L,)`` squared norms ``‖θₖ*‖²`` per prior layer.
        sizes: ``Pₖ`` per prior layer.
        prior_precision: ``(L,)`` τₖ (a scalar prior is one layer).
        logdet_precision: ``log det P`` of the posterior precision.

    Returns:
        A 0-dim float64 tensor (differentiable in its tensor arguments).

    Example:
        >>> # one parameter, F = 0: the evidence of a prior with no data is 0
        >>> two = torch.tensor([2.0], dtype=torch.float64)
        >>> log_evidence(0.0, torch.tensor([4.0]), [1], two, two.log().sum()).item() + 4.0
        0.0
    """
    n = torch.as_tensor(sizes, dtype=torch.float64)
    tau = prior_precision.to(torch.float64).reshape(-1)
    prior = 0.5 * (n * tau.log()).sum() - 0.5 * (tau * theta_sq.double()).sum()
    return torch.as_tensor(loglik, dtype=torch.float64) + prior - 0.5 * logdet_precision


def maximise_evidence(
    loglik: float,
    theta_sq: Tensor,
    sizes: Sequence[int],
    eigvals: Sequence[Tensor],
    temperature: float,
    initial: Tensor,
) -> Tensor:
    """The prior precisions τₖ maximising :func:`log_evidence` at a fixed θ*.

    ``log det P = Σₖ Σᵢ log(λₖᵢ / T + τₖ)`` from the Fisher's eigenvalues per prior
    layer, so each evaluation is O(P) and the gradient is exact; L-BFGS-B runs over
    ``log τ`` (scipy).

    Args:
        loglik: ``log p(D | θ*)`` (constant in τ).
        theta_sq: ``(L,)`` squared norms per layer.
        sizes: Parameters per layer.
        eigvals: The Fisher's eigenvalues per layer (clamped at 0).
        temperature: ``T``.
        initial: ``(L,)`` starting τ.

    Returns:
        ``(L,)`` float64 τ.

    Example:
        >>> # F = λ = 1 on one parameter, θ² = 1/2: d/dτ [½ log τ − ½ τ θ² − ½ log(λ + τ)] = 0
        >>> tau = maximise_evidence(0.0, torch.tensor([0.5]), [1], [torch.tensor([1.0])],
        ...                         1.0, torch.tensor([1.0]))
        >>> round(tau.item(), 4)  # root of 1/τ − θ² − 1/(λ + τ) = 0: τ = 1
        1.0
    """
    lams = [e.double().clamp_min(0) / temperature for e in eigvals]

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        log_tau = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        tau = log_tau.exp()
        logdet = sum((torch.log(lam + t).sum() for lam, t in zip(lams, tau, strict=True)))
        value = -log_evidence(loglik, theta_sq, sizes, tau, torch.as_tensor(logdet))
        (grad,) = torch.autograd.grad(value, log_tau)
        return float(value.detach()), grad.numpy()

    x0 = initial.double().log().numpy()
    res = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=[(-30.0, 30.0)] * x0.size)
    return torch.from_numpy(np.exp(res.x)).to(torch.float64)
