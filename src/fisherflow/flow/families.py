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

from fisherflow.flow.glm_links import LINKS, Link

__all__ = [
    "ALIASES",
    "FAMILIES",
    "Family",
    "family",
    "glm_score_information",
]

_EPS = 1e-12
_LOG_2PI = math.log(2 * math.pi)


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


def _check_positive(y: Tensor) -> str | None:
    if bool((y <= 0).any()):
        return "y must be > 0"
    return None


def _check_any(y: Tensor) -> str | None:
    return None


# ------------------------------------------------------------------ variances
def _var_one(mu: Tensor, alpha: float) -> Tensor:
    return torch.ones_like(mu)


def _dvar_zero(mu: Tensor, alpha: float) -> Tensor:
    return torch.zeros_like(mu)


def _var_binary(mu: Tensor, alpha: float) -> Tensor:
    m = _clamp_prob(mu)
    return m * (1 - m)


def _dvar_binary(mu: Tensor, alpha: float) -> Tensor:
    return 1 - 2 * mu


def _var_mu(mu: Tensor, alpha: float) -> Tensor:
    return mu.clamp_min(1e-300)


def _var_mu2(mu: Tensor, alpha: float) -> Tensor:
    return mu**2


def _var_mu3(mu: Tensor, alpha: float) -> Tensor:
    return mu**3


def _var_nb(mu: Tensor, alpha: float) -> Tensor:
    return mu + alpha * mu**2


# --------------------------------------------- log-likelihoods ℓ(y; μ, φ, v)
def _ll_gaussian(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    return -0.5 * (v * (y - mu) ** 2 / phi + _LOG_2PI + torch.log(phi / v))


def _ll_bernoulli(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    m = _clamp_prob(mu)
    return v * (torch.xlogy(y, m) + torch.xlogy(1 - y, 1 - m))


def _ll_poisson(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    return v * (torch.xlogy(y, mu) - mu - torch.lgamma(y + 1))


def _ll_gamma(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    k = v / phi
    return k * torch.log(k * y / mu) - k * y / mu - torch.lgamma(k) - torch.log(y)


def _ll_inverse_gaussian(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
    return -0.5 * (v * (y - mu) ** 2 / (y * mu**2 * phi) + _LOG_2PI + torch.log(phi * y**3 / v))


def _ll_negative_binomial(y: Tensor, mu: Tensor, phi: float, v: Tensor, alpha: float) -> Tensor:
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
def _dev_gaussian(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    return (y - mu) ** 2


def _dev_binary(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    m = _clamp_prob(mu)
    return 2 * (torch.xlogy(y, y / m) + torch.xlogy(1 - y, (1 - y) / (1 - m)))


def _dev_poisson(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    return 2 * (torch.xlogy(y, y / mu) - (y - mu))


def _dev_gamma(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    return 2 * (-torch.log(y / mu) + (y - mu) / mu)


def _dev_inverse_gaussian(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    return (y - mu) ** 2 / (y * mu**2)


def _dev_negative_binomial(y: Tensor, mu: Tensor, alpha: float) -> Tensor:
    return 2 * (
        torch.xlogy(y, y / mu) - (y + 1 / alpha) * torch.log((1 + alpha * y) / (1 + alpha * mu))
    )


def _in_unit(mu: Tensor) -> Tensor:
    return (mu > 0) & (mu < 1)


def _positive(mu: Tensor) -> Tensor:
    return mu > 0


def _any_mean(mu: Tensor) -> Tensor:
    return torch.isfinite(mu)


@dataclass(frozen=True)
class Family:
    """A GLM family with its link.

    Attributes:
        name: Family name (the ``likelihood`` recorded on its information).
        link: The :class:`~fisherflow.flow.glm_links.Link`.
        variance_fn: ``V(μ, α)``.
        variance_deriv: ``V'(μ, α)``.
        loglik_fn: ``ℓ(y, μ, φ, v, α)`` per observation (binomial: per trial, the
            binomial coefficient left out).
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
        if self.valid_mean is _in_unit:
            return (w * y + 0.5) / (w + 1)
        ybar = (w * y).sum() / w.sum().clamp_min(1e-300)
        mu = (y + ybar) / 2
        if self.valid_mean is _positive or self.link.name != "identity":
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


_BINARY = ((_var_binary, _dvar_binary), _ll_bernoulli, _dev_binary, _check_binary, _in_unit)

#: GLM families by name, each with its default (first-listed) link.
FAMILIES: dict[str, Family] = {
    "gaussian": _make(
        "gaussian",
        ("identity", "log", "inverse_power"),
        (_var_one, _dvar_zero),
        _ll_gaussian,
        _dev_gaussian,
        _check_any,
        _any_mean,
        has_scale=True,
        ml_scale_llf=True,
    ),
    "bernoulli": _make("bernoulli", ("logit", "probit"), *_BINARY, binary=True),
    "probit": _make("probit", ("probit",), *_BINARY, binary=True),
    "binomial": _make("binomial", ("logit", "probit"), *_BINARY),
    "poisson": _make(
        "poisson",
        ("log", "identity"),
        (_var_mu, lambda m, a: torch.ones_like(m)),
        _ll_poisson,
        _dev_poisson,
        _check_count,
        _positive,
    ),
    "gamma": _make(
        "gamma",
        ("inverse_power", "log", "identity"),
        (_var_mu2, lambda m, a: 2 * m),
        _ll_gamma,
        _dev_gamma,
        _check_positive,
        _positive,
        has_scale=True,
        ml_scale_llf=True,
    ),
    "inverse_gaussian": _make(
        "inverse_gaussian",
        ("inverse_squared", "inverse_power", "log", "identity"),
        (_var_mu3, lambda m, a: 3 * m**2),
        _ll_inverse_gaussian,
        _dev_inverse_gaussian,
        _check_positive,
        _positive,
        has_scale=True,
        ml_scale_llf=True,
    ),
    "negative_binomial": _make(
        "negative_binomial",
        ("log", "identity"),
        (_var_nb, lambda m, a: 1 + 2 * a * m),
        _ll_negative_binomial,
        _dev_negative_binomial,
        _check_count,
        _positive,
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
