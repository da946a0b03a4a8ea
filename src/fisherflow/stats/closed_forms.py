"""Closed-form Fisher information of standard ``torch.distributions`` families.

Each function is registered with :func:`register_fisher` and returns the
per-observation Fisher matrix in the parameterisation the user gave. Every
entry is checked in ``tests/stats`` against the generic autograd path.

References:
    Lehmann & Casella (1998), *Theory of Point Estimation*, 2nd ed., §2.5;
    Lange, Little & Taylor (1989), "Robust statistical modeling using the t
    distribution", JASA 84(408) (Student-t, including ``df``);
    Magnus & Neudecker (1999), *Matrix Differential Calculus*, §15
    (multivariate normal covariance, duplication matrix);
    Mardia & Jupp (2000), *Directional Statistics*, §5.3 and §10.3
    (von Mises, A(κ) = I₁(κ)/I₀(κ)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Exponential,
    Gamma,
    Geometric,
    Laplace,
    MultivariateNormal,
    Normal,
    Poisson,
    StudentT,
    VonMises,
)

from fisherflow.stats._registry import register_fisher
from fisherflow.stats._special import bessel_ratio, bessel_ratio_derivative, trigamma

__all__: list[str] = []


def _scalar(v: Tensor) -> Tensor:
    return v[..., None, None]


def _diag2(a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    a, b = torch.broadcast_tensors(a, b)
    off = torch.zeros_like(a) if c is None else c.expand_as(a)
    return torch.stack([torch.stack([a, off], -1), torch.stack([off, b], -1)], -2)


def _logit_param(given: frozenset[str]) -> bool:
    return "logits" in given


@register_fisher(Bernoulli)
def _bernoulli(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    p = dist.probs
    if _logit_param(given):
        return ("logits",), _scalar(p * (1 - p))
    return ("probs",), _scalar(1.0 / (p * (1 - p)))


@register_fisher(Binomial)
def _binomial(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    p, n = dist.probs, dist.total_count.to(dist.probs.dtype)
    if _logit_param(given):
        return ("logits",), _scalar(n * p * (1 - p))
    return ("probs",), _scalar(n / (p * (1 - p)))


@register_fisher(Categorical)
def _categorical(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    # torch normalises its inputs (probs ↦ probs / Σ probs, logits ↦ softmax),
    # so the Fisher is wrt the raw input at Σ probs = 1: diag(1/p) − 11ᵀ, whose
    # null direction p is the scaling torch removes. logits: diag(p) − ppᵀ.
    p = dist.probs
    if _logit_param(given):
        return ("logits",), torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    ones = torch.ones_like(p)
    return ("probs",), torch.diag_embed(1.0 / p) - ones[..., :, None] * ones[..., None, :]


@register_fisher(Geometric)
def _geometric(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    # torch's Geometric counts failures before the first success.
    p = dist.probs
    if _logit_param(given):
        return ("logits",), _scalar(1 - p)
    return ("probs",), _scalar(1.0 / (p**2 * (1 - p)))


@register_fisher(Poisson)
def _poisson(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    return ("rate",), _scalar(1.0 / dist.rate)


@register_fisher(Exponential)
def _exponential(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    return ("rate",), _scalar(dist.rate**-2)


@register_fisher(Gamma)
def _gamma(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    a, b = dist.concentration, dist.rate
    return ("concentration", "rate"), _diag2(trigamma(a), a / b**2, -1.0 / b)


@register_fisher(Beta)
def _beta(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    a, b = dist.concentration1, dist.concentration0
    ab = trigamma(a + b)
    return ("concentration1", "concentration0"), _diag2(trigamma(a) - ab, trigamma(b) - ab, -ab)


@register_fisher(Normal)
def _normal(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    s = dist.scale
    return ("loc", "scale"), _diag2(s**-2, 2.0 * s**-2)


@register_fisher(Laplace)
def _laplace(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    s = dist.scale
    return ("loc", "scale"), _diag2(s**-2, s**-2)


@register_fisher(StudentT)
def _student_t(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    nu, s = dist.df, dist.scale
    nu, s = torch.broadcast_tensors(nu, s)
    f_loc = (nu + 1) / ((nu + 3) * s**2)
    f_scale = 2 * nu / ((nu + 3) * s**2)
    f_df = 0.25 * (trigamma(nu / 2) - trigamma((nu + 1) / 2)) - (nu + 5) / (
        2 * nu * (nu + 1) * (nu + 3)
    )
    f_df_scale = -2.0 / ((nu + 1) * (nu + 3) * s)
    z = torch.zeros_like(nu)
    rows = [
        torch.stack([f_df, z, f_df_scale], -1),
        torch.stack([z, f_loc, z], -1),
        torch.stack([f_df_scale, z, f_scale], -1),
    ]
    return ("df", "loc", "scale"), torch.stack(rows, -2)


def _sym_basis(d: int, dtype: torch.dtype) -> Tensor:
    """E_a for each vech coordinate a: (d(d+1)/2, d, d); off-diagonals hit both entries."""
    rows, cols = torch.tril_indices(d, d)
    e = torch.zeros(rows.numel(), d, d, dtype=dtype)
    idx = torch.arange(rows.numel())
    e[idx, rows, cols] = 1.0
    e[idx, cols, rows] = 1.0
    return e


@register_fisher(MultivariateNormal)
def _mvn(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    # Fisher wrt (μ, vech Σ): [[Σ⁻¹, 0], [0, ½ tr(Σ⁻¹ E_a Σ⁻¹ E_b)]].
    prec = dist.precision_matrix
    d = prec.shape[-1]
    e = _sym_basis(d, prec.dtype)  # (q, d, d)
    pe = prec[..., None, :, :] @ e  # batch + (q, d, d)
    f_cov = 0.5 * torch.einsum("...aij,...bji->...ab", pe, pe)
    q = e.shape[0]
    batch = prec.shape[:-2]
    out = prec.new_zeros(*batch, d + q, d + q)
    out[..., :d, :d] = prec
    out[..., d:, d:] = f_cov
    return ("loc", "covariance_matrix"), out


@register_fisher(VonMises)
def _von_mises(dist: Any, given: frozenset[str]) -> tuple[tuple[str, ...], Tensor]:
    # I(μ, κ) = diag(κ A(κ), A'(κ)), A = I₁/I₀ and A' = 1 − A/κ − A² (Mardia & Jupp
    # 2000, §10.3); A' by an asymptotic series for large κ (see _special).
    k = dist.concentration
    return ("loc", "concentration"), _diag2(k * bessel_ratio(k), bessel_ratio_derivative(k))
