"""Observed information and empirical Fisher of a user log-likelihood.

Three objects are easily confused (Efron & Hinkley 1978; Kunstner, Balles &
Hennig 2019, "Limitations of the empirical Fisher approximation"):

* **expected** Fisher n·F(θ) = n·E_{x∼p_θ}[s sᵀ] — an expectation under the
  *model* (:func:`fisherflow.stats.fisher_information`);
* **observed** information J(θ) = −Σₙ ∇² log p(xₙ | θ) — the curvature of the
  log-likelihood *at the data*;
* **empirical** Fisher Σₙ s(xₙ) s(xₙ)ᵀ — score outer products at the data.

All three agree in expectation at the true parameter of a well-specified
model; at the MLE of a misspecified model, or away from the truth, they
differ (the "sandwich" uses both observed and empirical).

This module is the one autograd implementation of scores and information of a
user log-likelihood: :mod:`fisherflow.flow`'s ``FisherFlow.from_log_likelihood``
builds on :func:`observation_scores` and :func:`observed_information`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["empirical_fisher", "observation_scores", "observed_information"]

LogLikelihood = Callable[[Tensor, Any], Tensor]


def _check(log_likelihood: Any, theta: Any) -> Tensor:
    if not callable(log_likelihood):
        raise TypeError(f"log_likelihood must be callable, got {log_likelihood!r}")
    if not isinstance(theta, Tensor):
        raise TypeError(f"theta must be a tensor, got {type(theta).__name__}")
    if theta.dim() != 1:
        raise ValueError(f"theta must be a 1-D parameter vector, got shape {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be floating point, got dtype {theta.dtype}")
    return theta.detach()


def observed_information(log_likelihood: LogLikelihood, theta: Tensor, data: Any) -> Tensor:
    """Observed information J(θ) = −∇²_θ Σₙ log p(xₙ | θ).

    The curvature of the log-likelihood at the observed data. Unlike the
    expected Fisher it depends on the sample and can be indefinite away from
    the MLE; unlike the empirical Fisher it uses second derivatives. Its
    inverse at the MLE is the usual (observed) covariance estimate.

    Args:
        log_likelihood: ``log_likelihood(theta, data)`` returning per-observation
            log-likelihoods (shape ``(n,)``) or their sum (a scalar).
        theta: 1-D parameter vector.
        data: anything ``log_likelihood`` accepts.

    Returns:
        (k, k) tensor: the total over observations (information is additive).

    Raises:
        TypeError: ``log_likelihood`` is not callable or ``theta`` not a float tensor.
        ValueError: ``theta`` is not 1-D.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        >>> ll = lambda t, x: torch.distributions.Bernoulli(probs=t[0]).log_prob(x)
        >>> # at the MLE p̂ = 0.75 it equals n/(p̂(1-p̂)) = 4/0.1875
        >>> round(observed_information(ll, torch.tensor([0.75], dtype=torch.float64), x).item(), 6)
        21.333333
    """
    t = _check(log_likelihood, theta)
    hess = torch.autograd.functional.hessian(lambda p: log_likelihood(p, data).sum(), t)
    return -hess


def empirical_fisher(log_likelihood: LogLikelihood, theta: Tensor, data: Any) -> Tensor:
    """Empirical Fisher Σₙ ∇_θ log p(xₙ | θ) ∇_θ log p(xₙ | θ)ᵀ.

    Per-observation score outer products at the data — never the outer
    product of the mean gradient. It equals the expected Fisher only in
    expectation at the true parameter of a correct model; at the MLE of a
    misspecified model it is the "meat" of the sandwich estimator, and used
    as a preconditioner it can be badly distorted (Kunstner et al. 2019).

    Args:
        log_likelihood: ``log_likelihood(theta, data)`` returning
            per-observation log-likelihoods, shape ``(n,)``.
        theta: 1-D parameter vector.
        data: anything ``log_likelihood`` accepts.

    Returns:
        (k, k) tensor: the sum over the n observations.

    Raises:
        TypeError: invalid ``log_likelihood`` or ``theta``.
        ValueError: ``log_likelihood`` does not return a 1-D tensor.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        >>> ll = lambda t, x: torch.distributions.Bernoulli(probs=t[0]).log_prob(x)
        >>> # scores 1/p and -1/(1-p) at p = 0.75: 3/0.5625 + 1/0.0625
        >>> round(empirical_fisher(ll, torch.tensor([0.75], dtype=torch.float64), x).item(), 6)
        21.333333
    """
    _, scores = observation_scores(log_likelihood, theta, data)
    return scores.transpose(0, 1) @ scores


def observation_scores(
    log_likelihood: LogLikelihood, theta: Tensor, data: Any
) -> tuple[Tensor, Tensor]:
    """Per-observation log-likelihoods and scores ``sₙ = ∇_θ log p(xₙ | θ)``.

    Args:
        log_likelihood: ``log_likelihood(theta, data)`` returning per-observation
            log-likelihoods, shape ``(n,)``.
        theta: 1-D parameter vector of length k.
        data: anything ``log_likelihood`` accepts.

    Returns:
        ``(values (n,), scores (n, k))``, detached.

    Raises:
        TypeError: invalid ``log_likelihood`` or ``theta``, or a non-tensor result.
        ValueError: ``log_likelihood`` does not return a 1-D tensor.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 3.0], dtype=torch.float64)
        >>> ll = lambda t, x: -0.5 * (x - t[0]) ** 2  # N(mu, 1): score x - mu
        >>> observation_scores(ll, torch.zeros(1, dtype=torch.float64), x)[1].flatten().tolist()
        [1.0, 3.0]
    """
    t = _check(log_likelihood, theta)
    with torch.no_grad():
        probe = log_likelihood(t, data)
    if not isinstance(probe, Tensor):
        raise TypeError(f"log_likelihood must return a Tensor, got {type(probe).__name__}")
    if probe.dim() != 1:
        raise ValueError(
            "log_likelihood must return per-observation log-likelihoods of shape (n,), got "
            f"{tuple(probe.shape)}"
        )
    return probe.detach(), _per_example_scores(log_likelihood, t, data)  # (n,), (n, k)


def _per_example_scores(log_likelihood: LogLikelihood, theta: Tensor, data: Any) -> Tensor:
    # k backward passes instead of n: the columns of J = ∂y/∂θ are
    # ∂(Jᵀu)ᵢ/∂u for a dummy u (the "double-backward" trick).
    x = theta.clone().requires_grad_(True)
    with torch.enable_grad():
        y = log_likelihood(x, data)
        u = torch.zeros_like(y, requires_grad=True)
        (jtu,) = torch.autograd.grad(y, x, grad_outputs=u, create_graph=True)
        cols = []
        for i in range(x.shape[0]):
            (c,) = torch.autograd.grad(jtu[i], u, retain_graph=True, allow_unused=True)
            cols.append(torch.zeros_like(y) if c is None else c)
    return torch.stack(cols, -1).detach()
