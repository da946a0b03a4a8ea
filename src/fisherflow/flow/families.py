"""GLM families for Fisher scoring: links, variances, scores and expected information.

For a GLM with linear predictor ``η = Xβ``, mean ``μ = h(η)``, variance function
``V(μ)`` and prior weights ``w`` (frequency weights; binomial trials), Fisher scoring
uses (McCullagh & Nelder 1989, *Generalized Linear Models*, 2nd ed., §2.5):

* score ``U = Σᵢ wᵢ (yᵢ - μᵢ) h'(ηᵢ) / V(μᵢ) · xᵢ``;
* expected information ``J = Σᵢ wᵢ h'(ηᵢ)² / V(μᵢ) · xᵢ xᵢᵀ``.

Both are sums over observations, so they accumulate batch by batch. For canonical
links (bernoulli, poisson, binomial, gaussian) expected and observed information
coincide.

**Names.** The likelihood names are those of :mod:`fisherflow.estimation` and
DESIGN.md: ``"gaussian"``, ``"bernoulli"`` (logit link), ``"poisson"``, plus
``"probit"`` (Bernoulli with a probit link) and ``"binomial"`` (proportions with
trials). ``"logistic"`` is a documented alias of ``"bernoulli"`` (:data:`ALIASES`);
information from a ``"logistic"`` model is recorded as ``likelihood="bernoulli"``.

The gaussian family works with unit scale; the dispersion ``σ²`` is estimated
separately by the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ALIASES", "FAMILIES", "Family", "family", "glm_score_information"]

_EPS = 1e-12


def _clamp_prob(mu: Tensor) -> Tensor:
    return mu.clamp(_EPS, 1 - _EPS)


def _check_binary(y: Tensor) -> str | None:
    if bool(((y < 0) | (y > 1)).any()):
        return "y must lie in [0, 1] (0/1 outcomes or proportions)"
    return None


def _check_count(y: Tensor) -> str | None:
    if bool((y < 0).any()):
        return "y must be >= 0 (counts)"
    return None


def _check_any(y: Tensor) -> str | None:
    return None


def _bernoulli_ll(y: Tensor, mu: Tensor) -> Tensor:
    mu = _clamp_prob(mu)
    return y * torch.log(mu) + (1 - y) * torch.log1p(-mu)


def _poisson_ll(y: Tensor, mu: Tensor) -> Tensor:
    return y * torch.log(mu.clamp_min(1e-300)) - mu - torch.lgamma(y + 1)


def _gaussian_ll(y: Tensor, mu: Tensor) -> Tensor:
    return -0.5 * (y - mu) ** 2 - 0.5 * math.log(2 * math.pi)


def _probit_mu(eta: Tensor) -> Tensor:
    return torch.special.ndtr(eta)


def _probit_dmu(eta: Tensor) -> Tensor:
    return torch.exp(-0.5 * eta**2) / math.sqrt(2 * math.pi)


@dataclass(frozen=True)
class Family:
    """A GLM family: inverse link, its derivative, variance function, log-likelihood.

    Attributes:
        name: Family name.
        link: Link name (for reports).
        mean: ``h(η)``, the inverse link.
        mean_deriv: ``h'(η)``.
        variance: ``V(μ)``.
        loglik: Per-observation log-likelihood ``ℓ(y, μ)`` at unit weight and scale
            (binomial: per trial, ``y`` a proportion; the binomial coefficient is
            left out).
        check_y: Returns an error message for an invalid response, else ``None``.
        has_scale: Whether a dispersion is estimated (gaussian).
    """

    name: str
    link: str
    mean: Callable[[Tensor], Tensor]
    mean_deriv: Callable[[Tensor], Tensor]
    variance: Callable[[Tensor], Tensor]
    loglik: Callable[[Tensor, Tensor], Tensor]
    check_y: Callable[[Tensor], str | None]
    has_scale: bool = False
    binary: bool = False


_LOGIT = {
    "mean": torch.sigmoid,
    "mean_deriv": lambda eta: torch.sigmoid(eta) * torch.sigmoid(-eta),
    "variance": lambda mu: _clamp_prob(mu) * (1 - _clamp_prob(mu)),
    "loglik": _bernoulli_ll,
    "check_y": _check_binary,
}

#: GLM families by name.
FAMILIES: dict[str, Family] = {
    "gaussian": Family(
        "gaussian",
        "identity",
        lambda e: e,
        torch.ones_like,
        torch.ones_like,
        _gaussian_ll,
        _check_any,
        has_scale=True,
    ),
    "bernoulli": Family("bernoulli", "logit", binary=True, **_LOGIT),  # type: ignore[arg-type]
    "probit": Family(
        "probit",
        "probit",
        _probit_mu,
        _probit_dmu,
        lambda mu: _clamp_prob(mu) * (1 - _clamp_prob(mu)),
        _bernoulli_ll,
        _check_binary,
        binary=True,
    ),
    "poisson": Family(
        "poisson",
        "log",
        torch.exp,
        torch.exp,
        lambda mu: mu.clamp_min(1e-300),
        _poisson_ll,
        _check_count,
    ),
    "binomial": Family("binomial", "logit", **_LOGIT),  # type: ignore[arg-type]
}


#: Other names accepted for a family: ``alias -> canonical name``.
ALIASES: dict[str, str] = {"logistic": "bernoulli"}


def family(name: object) -> Family:
    """The family called ``name`` (canonical or alias, see :data:`ALIASES`).

    Raises:
        ValueError: If the name is unknown (the message lists names and aliases).

    Example:
        >>> family("logistic").name
        'bernoulli'
    """
    if isinstance(name, str) and name in ALIASES:
        name = ALIASES[name]
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(
            f"family must be one of {sorted(FAMILIES)} (aliases: {ALIASES}), got {name!r}"
        )
    return FAMILIES[name]


def glm_score_information(
    family: Family, X: Tensor, y: Tensor, w: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Score, expected information and log-likelihood of one batch at ``β`` (pure).

    Args:
        family: The family.
        X: ``(n, p)`` design.
        y: ``(n,)`` response (binomial: proportions).
        w: ``(n,)`` prior weights (binomial: trials times frequency weights).
        beta: ``(p,)`` coefficients.

    Returns:
        ``(score (p,), information (p, p), loglik (scalar), eta (n,))``.

    Example:
        >>> X = torch.ones(2, 1, dtype=torch.float64); y = torch.tensor([0.0, 1.0], dtype=X.dtype)
        >>> w, b = torch.ones(2, dtype=X.dtype), torch.zeros(1, dtype=X.dtype)
        >>> U, J, _, _ = glm_score_information(FAMILIES["bernoulli"], X, y, w, b)
        >>> U.tolist(), J.tolist()  # score Σ(y - 1/2) = 0, information Σ 1/4 = 1/2
        ([0.0], [[0.5]])
    """
    eta = X @ beta
    mu = family.mean(eta)
    dmu = family.mean_deriv(eta)
    var = family.variance(mu)
    score = X.T @ (w * (y - mu) * dmu / var)
    weight = w * dmu**2 / var
    info = (X * weight[:, None]).T @ X
    loglik = (w * family.loglik(y, mu)).sum()
    return score, 0.5 * (info + info.T), loglik, eta
