"""Per-observation functions of the GLM families: variances, log-likelihoods, deviances.

Pure elementwise torch functions used by :mod:`fisherflow.flow.families`
(McCullagh & Nelder 1989, *Generalized Linear Models*, 2nd ed., ch. 2 and 8;
the log-likelihoods are the densities of statsmodels' ``loglike_obs``: variance
weights ``v`` and dispersion ``φ`` enter as ``Var y = φ V(μ)/v``). Each variance,
log-likelihood and deviance takes the negative binomial ``α`` (ignored elsewhere).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "check_any",
    "check_binary",
    "check_count",
    "check_positive",
    "clamp_prob",
    "deviance_binary",
    "deviance_gamma",
    "deviance_gaussian",
    "deviance_inverse_gaussian",
    "deviance_negative_binomial",
    "deviance_poisson",
    "loglik_bernoulli",
    "loglik_binomial",
    "loglik_gamma",
    "loglik_gaussian",
    "loglik_inverse_gaussian",
    "loglik_negative_binomial",
    "loglik_poisson",
    "mean_finite",
    "mean_in_unit",
    "mean_positive",
    "variance_binary",
    "variance_deriv_binary",
    "variance_deriv_zero",
    "variance_mu",
    "variance_mu2",
    "variance_mu3",
    "variance_nb",
    "variance_one",
]

_EPS = 1e-12
_LOG_2PI = math.log(2 * math.pi)


def clamp_prob(mu: Tensor) -> Tensor:
    """``μ`` kept inside ``[ε, 1 - ε]`` (ε = 1e-12)."""
    return mu.clamp(_EPS, 1 - _EPS)


def check_binary(y: Tensor) -> str | None:
    """Error message unless every ``y`` is in ``[0, 1]``."""
    if bool(((y < 0) | (y > 1)).any()):
        return "y must lie in [0, 1] (0/1 outcomes or proportions)"
    return None


def check_count(y: Tensor) -> str | None:
    """Error message unless every ``y`` is ``>= 0``."""
    if bool((y < 0).any()):
        return "y must be >= 0 (counts)"
    return None


def check_positive(y: Tensor) -> str | None:
    """Error message unless every ``y`` is ``> 0``."""
    if bool((y <= 0).any()):
        return "y must be > 0"
    return None


def check_any(y: Tensor) -> str | None:
    """No constraint on ``y`` (gaussian)."""
    return None


# ------------------------------------------------------------------ variances
def variance_one(mu: Tensor, alpha: float) -> Tensor:
    """``V(μ) = 1`` (gaussian)."""
    return torch.ones_like(mu)


def variance_deriv_zero(mu: Tensor, alpha: float) -> Tensor:
    """``V'(μ) = 0``."""
    return torch.zeros_like(mu)


def variance_binary(mu: Tensor, alpha: float) -> Tensor:
    """``V(μ) = μ(1 - μ)`` (bernoulli, binomial)."""
    m = clamp_prob(mu)
    return m * (1 - m)


def variance_deriv_binary(mu: Tensor, alpha: float) -> Tensor:
    """``V'(μ) = 1 - 2μ``."""
    return 1 - 2 * mu


def variance_mu(mu: Tensor, alpha: float) -> Tensor:
    """``V(μ) = μ`` (poisson)."""
    return mu.clamp_min(1e-300)


def variance_mu2(mu: Tensor, alpha: float) -> Tensor:
    """``V(μ) = μ²`` (gamma)."""
    return mu**2


def variance_mu3(mu: Tensor, alpha: float) -> Tensor:
    """``V(μ) = μ³`` (inverse gaussian)."""
    return mu**3


def variance_nb(mu: Tensor, alpha: float) -> Tensor:
    """``V(μ) = μ + αμ²`` (negative binomial, NB2)."""
    return mu + alpha * mu**2


# --------------------------------------------- log-likelihoods ℓ(y; μ, φ, v)
def loglik_gaussian(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    """``-½ [v (y - μ)²/φ + log(2π φ/v)]``."""
    return -0.5 * (v * (y - mu) ** 2 / phi + _LOG_2PI + torch.log(phi / v))


def loglik_bernoulli(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    """``v [y log μ + (1 - y) log(1 - μ)]`` (per trial, no binomial coefficient)."""
    m = clamp_prob(mu)
    return v * (torch.xlogy(y, m) + torch.xlogy(1 - y, 1 - m))


def loglik_binomial(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    """``log C(m, m y) + m [y log μ + (1 - y) log(1 - μ)]`` with ``m = v`` trials.

    The binomial log-probability of ``m y`` successes in ``m`` trials, as R's
    ``binomial()$aic`` and statsmodels' ``Binomial.loglike_obs`` count it: the log
    binomial coefficient (``lgamma``, so non-integer counts are allowed as in
    statsmodels; R rounds them) is included. ``v`` is the trials times any variance
    weights: with variance weights on top of counts, statsmodels instead multiplies
    ``log C(trials, successes)`` by the weight.

    Example:
        >>> y, mu, m = torch.tensor([0.3]), torch.tensor([0.4]), torch.tensor([10.0])
        >>> exact = math.log(math.comb(10, 3) * 0.4**3 * 0.6**7)  # P(3 of 10), p = 0.4
        >>> round(loglik_binomial(y, mu, 1.0, m, 0.0).item(), 5) == round(exact, 5)
        True
    """
    k = v * y
    coef = torch.lgamma(v + 1) - torch.lgamma(k + 1) - torch.lgamma(v - k + 1)
    return coef + loglik_bernoulli(y, mu, phi, v, alpha)


def loglik_poisson(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    """``v [y log μ - μ - log y!]``."""
    return v * (torch.xlogy(y, mu) - mu - torch.lgamma(y + 1))


def loglik_gamma(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    """Gamma log-density with shape ``k = v/φ`` and mean ``μ``."""
    k = v / phi
    return k * torch.log(k * y / mu) - k * y / mu - torch.lgamma(k) - torch.log(y)


def loglik_inverse_gaussian(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    """``-½ [v (y - μ)²/(y μ² φ) + log(2π φ y³/v)]``."""
    return -0.5 * (v * (y - mu) ** 2 / (y * mu**2 * phi) + _LOG_2PI + torch.log(phi * y**3 / v))


def loglik_negative_binomial(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    """NB2 log-probability with ``α`` (statsmodels, MASS ``negative.binomial(1/α)``)."""
    am = alpha * mu
    ll = (
        torch.xlogy(y, am)
        - (y + 1 / alpha) * torch.log1p(am)
        + torch.lgamma(y + 1 / alpha)
        - math.lgamma(1 / alpha)
        - torch.lgamma(y + 1)
    )
    return v / phi * ll


# ------------------------------------------------------ unit deviances d(y, μ)
def deviance_gaussian(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    """``(y - μ)²``."""
    return (y - mu) ** 2


def deviance_binary(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    """``2 [y log(y/μ) + (1 - y) log((1 - y)/(1 - μ))]``."""
    m = clamp_prob(mu)
    return 2 * (torch.xlogy(y, y / m) + torch.xlogy(1 - y, (1 - y) / (1 - m)))


def deviance_poisson(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    """``2 [y log(y/μ) - (y - μ)]``."""
    return 2 * (torch.xlogy(y, y / mu) - (y - mu))


def deviance_gamma(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    """``2 [-log(y/μ) + (y - μ)/μ]``."""
    return 2 * (-torch.log(y / mu) + (y - mu) / mu)


def deviance_inverse_gaussian(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    """``(y - μ)²/(y μ²)``."""
    return (y - mu) ** 2 / (y * mu**2)


def deviance_negative_binomial(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    """``2 [y log(y/μ) - (y + 1/α) log((1 + αy)/(1 + αμ))]``."""
    return 2 * (
        torch.xlogy(y, y / mu) - (y + 1 / alpha) * torch.log((1 + alpha * y) / (1 + alpha * mu))
    )


def mean_in_unit(mu: Tensor) -> Tensor:
    """Means strictly inside ``(0, 1)``."""
    return (mu > 0) & (mu < 1)


def mean_positive(mu: Tensor) -> Tensor:
    """Means ``> 0``."""
    return mu > 0


def mean_finite(mu: Tensor) -> Tensor:
    """Finite means."""
    return torch.isfinite(mu)
