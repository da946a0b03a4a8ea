"""GLM link functions: the inverse link ``μ = h(η)`` with its first two derivatives.

A link is given by its inverse ``h``, ``h'`` and ``h''`` (the observed information of
a non-canonical link needs ``h''``) and by the link ``g = h⁻¹`` itself, used only to
start Fisher scoring from the data (``η₀ = g(μ₀)``, McCullagh & Nelder 1989,
*Generalized Linear Models*, 2nd ed., §2.5). Written in torch rather than borrowed
from ``statsmodels.genmod.families.links`` because every GLM statistic here is a
float64 tensor accumulated batch by batch, and statsmodels is an optional extra.

``valid(η)`` says where ``h`` gives a mean inside the family's range (the inverse
links are only valid for ``η > 0``); Fisher scoring halves a step that leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LINKS", "Link"]

_SQRT_2PI = math.sqrt(2 * math.pi)


def _always(eta: Tensor) -> Tensor:
    return torch.ones_like(eta, dtype=torch.bool)


def _positive(eta: Tensor) -> Tensor:
    return eta > 0


def _logit_dmu(eta: Tensor) -> Tensor:
    return torch.sigmoid(eta) * torch.sigmoid(-eta)


def _logit_d2mu(eta: Tensor) -> Tensor:
    return _logit_dmu(eta) * (1 - 2 * torch.sigmoid(eta))


def _probit_dmu(eta: Tensor) -> Tensor:
    return torch.exp(-0.5 * eta**2) / _SQRT_2PI


@dataclass(frozen=True)
class Link:
    """A link ``g`` through its inverse ``h = g⁻¹``.

    Attributes:
        name: Link name (for reports).
        inverse: ``h(η) = μ``.
        deriv: ``h'(η)``.
        deriv2: ``h''(η)``.
        link: ``g(μ) = η`` (used to start from the data).
        valid: Mask of linear predictors with a valid mean.

    Example:
        >>> eta = torch.tensor([0.5], dtype=torch.float64)
        >>> LINKS["inverse_power"].inverse(eta).item(), LINKS["inverse_power"].deriv(eta).item()
        (2.0, -4.0)
    """

    name: str
    inverse: Callable[[Tensor], Tensor]
    deriv: Callable[[Tensor], Tensor]
    deriv2: Callable[[Tensor], Tensor]
    link: Callable[[Tensor], Tensor]
    valid: Callable[[Tensor], Tensor] = _always


#: Links by name. ``"inverse_power"`` is ``η = 1/μ`` (Gamma's canonical link),
#: ``"inverse_squared"`` is ``η = 1/μ²`` (the inverse Gaussian's).
LINKS: dict[str, Link] = {
    "identity": Link("identity", lambda e: e, torch.ones_like, torch.zeros_like, lambda m: m),
    "log": Link("log", torch.exp, torch.exp, torch.exp, torch.log),
    "logit": Link("logit", torch.sigmoid, _logit_dmu, _logit_d2mu, torch.logit),
    "probit": Link(
        "probit",
        torch.special.ndtr,
        _probit_dmu,
        lambda e: -e * _probit_dmu(e),
        torch.special.ndtri,
    ),
    "inverse_power": Link(
        "inverse_power",
        lambda e: 1 / e,
        lambda e: -1 / e**2,
        lambda e: 2 / e**3,
        lambda m: 1 / m,
        _positive,
    ),
    "inverse_squared": Link(
        "inverse_squared",
        lambda e: e.rsqrt(),
        lambda e: -0.5 * e ** (-1.5),
        lambda e: 0.75 * e ** (-2.5),
        lambda m: m ** (-2),
        _positive,
    ),
}
