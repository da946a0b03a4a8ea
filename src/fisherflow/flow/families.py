"""GLM families for Fisher scoring: variances, deviances, log-likelihoods, information.

For a GLM with linear predictor ``η = Xβ + offset``, mean ``μ = h(η)`` (a link of
:mod:`fisherflow.flow.glm_links`), variance ``Var(y) = φ V(μ) / v`` (dispersion ``φ``,
variance weight ``v``) and frequency weights ``f``, Fisher scoring uses
(McCullagh & Nelder 1989, *Generalized Linear Models*, 2nd ed., §2.5, §9.2):

* score ``U = Σᵢ fᵢ vᵢ (yᵢ - μᵢ) h'(ηᵢ) / V(μᵢ) · xᵢ`` (at unit dispersion);
* expected information ``J = Σᵢ fᵢ vᵢ h'(ηᵢ)² / V(μᵢ) · xᵢ xᵢᵀ``;
* observed information ``J - Σᵢ fᵢ vᵢ (yᵢ - μᵢ) [h''/V - h'² V'/V²](ηᵢ) · xᵢ xᵢᵀ``.

Everything is kept at unit dispersion; the model multiplies the covariance by the
estimated ``φ``. For canonical links (bernoulli/binomial logit, poisson log, gaussian
identity, gamma inverse, inverse-gaussian inverse-squared) expected and observed
information coincide.

**Names.** The likelihood names are those of :mod:`fisherflow.estimation`:
``"gaussian"``, ``"bernoulli"``, ``"poisson"``, plus ``"binomial"`` (proportions
with trials), ``"probit"`` (Bernoulli with the probit link), ``"gamma"``,
``"inverse_gaussian"`` and ``"negative_binomial"`` (NB2 with a fixed ``α``, variance
``μ + αμ²``). ``"logistic"`` is an alias of ``"bernoulli"`` (:data:`ALIASES`).

**Dispersion** is estimated as R's ``summary.glm`` does — Pearson ``χ²/(n - p)`` —
for every family but the bernoulli, binomial and poisson ones (``φ = 1``); R
estimates it for its ``negative.binomial(θ)`` family too. The reported
log-likelihood is R's ``logLik``: at ``φ = deviance / n`` for gaussian, gamma and
inverse gaussian, at ``φ = 1`` otherwise.

Written in torch rather than borrowed from ``statsmodels.genmod.families`` because
every statistic is a float64 tensor accumulated batch by batch and statsmodels is an
optional extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fisherflow.flow.glm_densities import (
    check_any,
    check_binary,
    check_count,
    check_positive,
    deviance_binary,
    deviance_gamma,
    deviance_gaussian,
    deviance_inverse_gaussian,
    deviance_negative_binomial,
    deviance_poisson,
    loglik_bernoulli,
    loglik_binomial,
    loglik_gamma,
    loglik_gaussian,
    loglik_inverse_gaussian,
    loglik_negative_binomial,
    loglik_poisson,
    mean_finite,
    mean_in_unit,
    mean_positive,
    variance_binary,
    variance_deriv_binary,
    variance_deriv_zero,
    variance_mu,
    variance_mu2,
    variance_mu3,
    variance_nb,
    variance_one,
)
from fisherflow.flow.glm_links import LINKS, Link

__all__ = [
    "ALIASES",
    "FAMILIES",
    "Family",
    "family",
    "glm_score_information",
]


@dataclass(frozen=True)
class Family:
    """A GLM family with its link.

    Attributes:
        name: Family name (the ``likelihood`` recorded on its information).
        link: The :class:`~fisherflow.flow.glm_links.Link`.
        variance_fn: ``V(μ, α)``.
        variance_deriv: ``V'(μ, α)``.
        loglik_fn: ``ℓ(y, μ, φ, v, α)`` per observation (binomial: with the log
            binomial coefficient of ``v`` trials, as R's ``logLik``).
        deviance_fn: Unit deviance ``d(y, μ, α)``.
        check_y: Returns an error message for an invalid response, else ``None``.
        valid_mean: Mask of means inside the family's range.
        links: Link names the family accepts (the first is its default).
        has_scale: Whether the dispersion ``φ`` is estimated (Pearson ``χ²/(n-p)``).
        binary: Whether outcomes are 0/1 (separation checks apply).
        alpha: Negative binomial ``α`` (0 elsewhere).
        ml_scale_llf: Whether ``llf`` is at ``φ = deviance/n`` (R's ``logLik``).
    """

    name: str
    link: Link
    variance_fn: Callable[[Tensor, float], Tensor]
    variance_deriv: Callable[[Tensor, float], Tensor]
    loglik_fn: Callable[[Tensor, Tensor, float, Tensor, float], Tensor]
    deviance_fn: Callable[[Tensor, Tensor, float], Tensor]
    check_y: Callable[[Tensor], str | None]
    valid_mean: Callable[[Tensor], Tensor]
    links: tuple[str, ...]
    has_scale: bool = False
    binary: bool = False
    alpha: float = 0.0
    ml_scale_llf: bool = False

    def mean(self, eta: Tensor) -> Tensor:
        """``μ = h(η)``."""
        return self.link.inverse(eta)

    def variance(self, mu: Tensor) -> Tensor:
        """``V(μ)``."""
        return self.variance_fn(mu, self.alpha)

    def loglik(self, y: Tensor, mu: Tensor, scale: float = 1.0, v: Tensor | None = None) -> Tensor:
        """Per-observation log-likelihood at dispersion ``scale`` and variance weights ``v``."""
        return self.loglik_fn(y, mu, scale, torch.ones_like(y) if v is None else v, self.alpha)

    def deviance(self, y: Tensor, mu: Tensor) -> Tensor:
        """Unit deviances ``d(y, μ)`` (``2 (ℓ_saturated - ℓ)`` at unit dispersion)."""
        return self.deviance_fn(y, mu, self.alpha)

    def valid(self, eta: Tensor) -> bool:
        """Whether every linear predictor gives a finite mean in the family's range."""
        if not bool(torch.isfinite(eta).all()) or not bool(self.link.valid(eta).all()):
            return False
        mu = self.mean(eta)
        return bool(torch.isfinite(mu).all()) and bool(self.valid_mean(mu).all())

    def start_mean(self, y: Tensor, w: Tensor) -> Tensor:
        """A mean to start Fisher scoring from the data (statsmodels' and R's rules).

        Binary and binomial: ``(w y + 1/2)/(w + 1)``; otherwise ``(y + ȳ)/2``, kept
        inside the family's range.
        """
        if self.valid_mean is mean_in_unit:
            return (w * y + 0.5) / (w + 1)
        ybar = (w * y).sum() / w.sum().clamp_min(1e-300)
        mu = (y + ybar) / 2
        if self.valid_mean is mean_positive or self.link.name != "identity":
            mu = mu.clamp_min(max(1e-3 * float(ybar.abs()), 1e-8))
        return mu


def _make(
    name: str,
    links: tuple[str, ...],
    variance: tuple[Callable[..., Tensor], Callable[..., Tensor]],
    loglik: Callable[..., Tensor],
    deviance: Callable[..., Tensor],
    check_y: Callable[[Tensor], str | None],
    valid_mean: Callable[[Tensor], Tensor],
    **flags: bool,
) -> Family:
    return Family(
        name,
        LINKS[links[0]],
        variance[0],
        variance[1],
        loglik,
        deviance,
        check_y,
        valid_mean,
        links,
        **flags,
    )


_BINARY = (
    (variance_binary, variance_deriv_binary),
    loglik_bernoulli,
    deviance_binary,
    check_binary,
    mean_in_unit,
)

#: GLM families by name, each with its default (first-listed) link.
FAMILIES: dict[str, Family] = {
    "gaussian": _make(
        "gaussian",
        ("identity", "log", "inverse_power"),
        (variance_one, variance_deriv_zero),
        loglik_gaussian,
        deviance_gaussian,
        check_any,
        mean_finite,
        has_scale=True,
        ml_scale_llf=True,
    ),
    "bernoulli": _make("bernoulli", ("logit", "probit"), *_BINARY, binary=True),
    "probit": _make("probit", ("probit",), *_BINARY, binary=True),
    "binomial": _make("binomial", ("logit", "probit"), _BINARY[0], loglik_binomial, *_BINARY[2:]),
    "poisson": _make(
        "poisson",
        ("log", "identity"),
        (variance_mu, lambda m, a: torch.ones_like(m)),
        loglik_poisson,
        deviance_poisson,
        check_count,
        mean_positive,
    ),
    "gamma": _make(
        "gamma",
        ("inverse_power", "log", "identity"),
        (variance_mu2, lambda m, a: 2 * m),
        loglik_gamma,
        deviance_gamma,
        check_positive,
        mean_positive,
        has_scale=True,
        ml_scale_llf=True,
    ),
    "inverse_gaussian": _make(
        "inverse_gaussian",
        ("inverse_squared", "inverse_power", "log", "identity"),
        (variance_mu3, lambda m, a: 3 * m**2),
        loglik_inverse_gaussian,
        deviance_inverse_gaussian,
        check_positive,
        mean_positive,
        has_scale=True,
        ml_scale_llf=True,
    ),
    "negative_binomial": _make(
        "negative_binomial",
        ("log", "identity"),
        (variance_nb, lambda m, a: 1 + 2 * a * m),
        loglik_negative_binomial,
        deviance_negative_binomial,
        check_count,
        mean_positive,
        has_scale=True,
    ),
}
FAMILIES["negative_binomial"] = replace(FAMILIES["negative_binomial"], alpha=1.0)

#: Other names accepted for a family: ``alias -> canonical name``.
ALIASES: dict[str, str] = {"logistic": "bernoulli"}


def family(name: object, link: object = None, alpha: object = None) -> Family:
    """The family called ``name`` (canonical or alias), with a link and NB ``α``.

    Args:
        name: A key of :data:`FAMILIES` or :data:`ALIASES`.
        link: A link name the family accepts (``None``: its default).
        alpha: Negative binomial ``α > 0`` (``None``: 1, as R's ``negative.binomial(1)``
            and statsmodels' default); only for ``"negative_binomial"``.

    Returns:
        The :class:`Family`.

    Raises:
        ValueError: If the name, link or ``alpha`` is invalid (the message lists valid
            values).

    Example:
        >>> family("logistic").name, family("gamma", link="log").link.name
        ('bernoulli', 'log')
    """
    if isinstance(name, str) and name in ALIASES:
        name = ALIASES[name]
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(
            f"family must be one of {sorted(FAMILIES)} (aliases: {ALIASES}), got {name!r}"
        )
    fam = FAMILIES[name]
    if link is not None:
        if not isinstance(link, str) or link not in fam.links:
            raise ValueError(
                f"link for family {name!r} must be one of {list(fam.links)}, got {link!r}"
            )
        fam = replace(fam, link=LINKS[link])
    if alpha is not None:
        if name != "negative_binomial":
            raise ValueError(
                f"alpha applies to family 'negative_binomial' only, got family {name!r}"
            )
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 < alpha < math.inf
        ):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        fam = replace(fam, alpha=float(alpha))
    return fam


def glm_score_information(
    family: Family,
    X: Tensor,
    y: Tensor,
    w: Tensor,
    beta: Tensor,
    offset: Tensor | None = None,
    observed: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Score, information and log-likelihood of one batch at ``β`` (pure, unit dispersion).

    Args:
        family: The family (with its link).
        X: ``(n, p)`` design.
        y: ``(n,)`` response (binomial: proportions).
        w: ``(n,)`` prior weights: frequency times variance weights (binomial trials
            count as variance weights).
        beta: ``(p,)`` coefficients.
        offset: Optional ``(n,)`` offset added to ``Xβ``.
        observed: Return the observed (negative Hessian) instead of the expected
            information.

    Returns:
        ``(score (p,), information (p, p), loglik (scalar, at φ = 1), eta (n,))``.

    Example:
        >>> X = torch.ones(2, 1, dtype=torch.float64); y = torch.tensor([0.0, 1.0], dtype=X.dtype)
        >>> w, b = torch.ones(2, dtype=X.dtype), torch.zeros(1, dtype=X.dtype)
        >>> U, J, _, _ = glm_score_information(FAMILIES["bernoulli"], X, y, w, b)
        >>> U.tolist(), J.tolist()  # score Σ(y - 1/2) = 0, information Σ 1/4 = 1/2
        ([0.0], [[0.5]])
    """
    eta = X @ beta if offset is None else X @ beta + offset
    link = family.link
    mu = link.inverse(eta)
    dmu = link.deriv(eta)
    var = family.variance(mu)
    resid = y - mu
    score = X.T @ (w * resid * dmu / var)
    weight = w * dmu**2 / var
    if observed:
        dvar = family.variance_deriv(mu, family.alpha)
        weight = weight - w * resid * (link.deriv2(eta) / var - dmu**2 * dvar / var**2)
    info = (X * weight[:, None]).T @ X
    loglik = (w * family.loglik(y, mu)).sum()
    return score, 0.5 * (info + info.T), loglik, eta
