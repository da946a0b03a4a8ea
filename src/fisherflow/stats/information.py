"""Expected Fisher information of ``torch.distributions`` families.

``fisher_information`` uses a registered closed form when one covers the
requested parameters and otherwise the generic autograd path
``fisher_information_generic``, which computes E[s sᵀ] with the score
s = ∇_θ log p(X | θ) by exact summation (finite support), a truncated series
(non-negative integer support), double-exponential quadrature (continuous 1-D
support) or Monte Carlo (anything else), and reports an error estimate.

References:
    Fisher (1925), "Theory of statistical estimation";
    Lehmann & Casella (1998), *Theory of Point Estimation*, §2.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.distributions import constraints as C

from fisherflow.stats import closed_forms as _closed_forms  # noqa: F401  (registers)
from fisherflow.stats._params import Family, check_int, prepare_family
from fisherflow.stats._quadrature import de_integrate, support_transform, true_support
from fisherflow.stats._registry import CLOSED_FORMS

__all__ = [
    "INTEGRATIONS",
    "METHODS",
    "QUADRATURE_RTOL",
    "FisherEstimate",
    "fisher_information",
    "fisher_information_generic",
]


@dataclass(frozen=True)
class FisherEstimate:
    """Result of the generic path.

    Attributes:
        information: Fisher matrix, shape ``batch + (m, m)``.
        error: entrywise error estimate, same shape (0 for exact sums; a
            standard error for Monte Carlo).
        integration: which rule produced it.
        wrt: parameter order of the matrix.
    """

    information: Tensor
    error: Tensor
    integration: str
    wrt: tuple[str, ...]


def _scores(fam: Family, theta: Tensor, x: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Per-point scores ∇_θ log p(x | θ) and log-densities for x of shape lead + batch + event."""
    lead = x.shape[: x.dim() - len(fam.batch_shape) - len(fam.dist.event_shape)]
    rep = theta.expand(torch.Size(tuple(lead) + tuple(theta.shape))).clone()
    if not rep.requires_grad:
        rep.requires_grad_(True)
    with torch.enable_grad():
        lp = fam.build(rep).log_prob(x)
        (g,) = torch.autograd.grad(lp.sum(), rep, create_graph=create_graph)
    return g, (lp if create_graph else lp.detach())


def _outer(g: Tensor) -> Tensor:
    return g[..., :, None] * g[..., None, :]


def _exact(fam: Family, theta: Tensor, create_graph: bool, **_: Any) -> tuple[Tensor, Tensor]:
    x = fam.build(theta.detach()).enumerate_support(expand=True)
    g, lp = _scores(fam, theta, x, create_graph)
    p = lp.exp()
    f = (p[..., None, None] * _outer(g)).sum(0)
    err = (1 - p.detach().sum(0)).abs()[..., None, None] * f.detach().abs()
    return f, err


def _series(
    fam: Family, theta: Tensor, create_graph: bool, tail: float = 1e-14, **_: Any
) -> tuple[Tensor, Tensor]:
    d = fam.build(theta.detach())
    mean, std = d.mean.detach(), d.stddev.detach()
    n = int(torch.max(mean + 12 * std).item()) + 32
    while True:
        x = torch.arange(n, dtype=theta.dtype).reshape(n, *([1] * len(fam.batch_shape)))
        x = x.expand(n, *fam.batch_shape)
        with torch.no_grad():
            mass = d.log_prob(x).exp().sum(0)
        if float((1 - mass).abs().max()) < tail or n > 10_000_000:
            break
        n *= 2
    if n > 10_000_000:
        raise ValueError(
            f"{fam.dist_cls.__name__}: the series for the Fisher information did not reach "
            f"a tail mass below {tail} within 10^7 terms"
        )
    g, lp = _scores(fam, theta, x, create_graph)
    f = (lp.exp()[..., None, None] * _outer(g)).sum(0)
    err = (1 - mass).abs()[..., None, None] * (1 + f.detach().abs()) * x[-1].max() ** 2
    return f, err


def _quadrature(
    fam: Family, theta: Tensor, create_graph: bool, seed: int = 0, **_: Any
) -> tuple[Tensor, Tensor]:
    d = fam.build(theta)

    def integrand(x: Tensor) -> Tensor:
        g, _lp = _scores(fam, theta, x, create_graph)
        return _outer(g)

    return de_integrate(d, integrand, seed=seed)


def _monte_carlo(
    fam: Family,
    theta: Tensor,
    create_graph: bool,
    seed: int = 0,
    num_samples: int = 100_000,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = fam.build(theta.detach()).sample((num_samples,))
    g, _lp = _scores(fam, theta, x, create_graph)
    o = _outer(g)
    f = o.mean(0)
    err = o.detach().std(0) / math.sqrt(num_samples)
    return f, err


INTEGRATIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "exact": _exact,
    "series": _series,
    "quadrature": _quadrature,
    "mc": _monte_carlo,
}


#: Largest error estimate the quadrature may report, relative to the scale
#: √(Fᵢᵢ Fⱼⱼ) of each entry, before the generic path refuses its result.
QUADRATURE_RTOL = 1e-4


def _auto_integration(fam: Family) -> str:
    d = fam.dist
    support: Any = true_support(d)
    if support.is_discrete:
        if d.has_enumerate_support:
            return "exact"
        if isinstance(support, type(C.nonnegative_integer)) and support.lower_bound == 0:
            return "series"
        return "mc"
    if d.event_shape == torch.Size([]):
        try:
            support_transform(support)
        except NotImplementedError:
            return "mc"
        return "quadrature"
    return "mc"


def _generic(
    fam: Family,
    theta: Tensor,
    integration: str,
    *,
    create_graph: bool = False,
    num_samples: int = 100_000,
    seed: int = 0,
    rtol: float = QUADRATURE_RTOL,
) -> FisherEstimate:
    if integration == "auto":
        integration = _auto_integration(fam)
    if integration not in INTEGRATIONS:
        raise ValueError(
            f"integration must be one of {['auto', *INTEGRATIONS]}, got {integration!r}"
        )
    if integration == "exact" and not fam.dist.has_enumerate_support:
        raise ValueError(
            f"integration='exact' needs a finite, enumerable support; "
            f"{fam.dist_cls.__name__} has support {fam.dist.support!r}"
        )
    check_int("num_samples", num_samples, 2)
    f, err = INTEGRATIONS[integration](fam, theta, create_graph, seed=seed, num_samples=num_samples)
    f = 0.5 * (f + f.transpose(-1, -2))
    if integration == "quadrature":
        _check_converged(fam, f.detach(), err, rtol)
    return FisherEstimate(f, err, integration, fam.wrt)


def _check_converged(fam: Family, f: Tensor, err: Tensor, rtol: float) -> None:
    """Refuse a quadrature whose error estimate is not small next to √(Fᵢᵢ Fⱼⱼ)."""
    d = f.diagonal(dim1=-2, dim2=-1).abs()
    scale = (d[..., :, None] * d[..., None, :]).sqrt()
    rel = err / scale.clamp_min(torch.finfo(f.dtype).tiny)
    worst = float(rel.nan_to_num(nan=math.inf).max()) if rel.numel() else 0.0
    if not (worst <= rtol and bool(torch.isfinite(f).all())):
        raise ValueError(
            f"{fam.dist_cls.__name__}: the quadrature for the Fisher information wrt "
            f"{list(fam.wrt)} did not converge (error estimate {worst:.3g} relative to "
            f"√(Fᵢᵢ Fⱼⱼ), tolerance {rtol:g}); register a closed form, use "
            "fisher_information_generic(..., integration='mc'), or move the parameters "
            "away from the extremes"
        )


def fisher_information_generic(
    dist_cls: type[Distribution],
    wrt: str | Iterable[str] | None = None,
    *,
    integration: str = "auto",
    num_samples: int = 100_000,
    seed: int = 0,
    rtol: float = QUADRATURE_RTOL,
    **params: Any,
) -> FisherEstimate:
    """Expected Fisher information by autograd, E[∇_θ log p ∇_θ log pᵀ].

    Args:
        dist_cls: a ``torch.distributions.Distribution`` subclass.
        wrt: parameter names (order of the matrix); default every given
            continuous parameter. Matrix parameters use the vech layout of
            :mod:`fisherflow.stats._params`.
        integration: ``"auto"``, ``"exact"`` (finite support), ``"series"``
            (support {0, 1, …}, summed until the tail mass is < 1e-14),
            ``"quadrature"`` (continuous 1-D support, double-exponential rule
            over the true support, e.g. [−π, π] for von Mises) or ``"mc"``
            (Monte Carlo with ``num_samples`` draws).
        num_samples: Monte Carlo sample count.
        seed: seed for the private RNG stream (the global RNG is untouched).
        rtol: largest quadrature error estimate accepted, relative to
            √(Fᵢᵢ Fⱼⱼ) entrywise.
        **params: constructor arguments of ``dist_cls``.

    Returns:
        A :class:`FisherEstimate` with the matrix and an error estimate.

    Raises:
        ValueError: invalid parameters, names or integration rule, or a
            quadrature whose error estimate exceeds ``rtol``.
        TypeError: ``dist_cls`` is not a distribution class.

    Example:
        >>> import torch
        >>> est = fisher_information_generic(torch.distributions.Poisson,
        ...                                  rate=torch.tensor(4.0, dtype=torch.float64))
        >>> round(est.information.item(), 10)  # 1/λ
        0.25
    """
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < math.inf:
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    fam = prepare_family(dist_cls, wrt, params)
    return _generic(fam, fam.theta, integration, num_samples=num_samples, seed=seed, rtol=rtol)


def _name_slices(dist: Distribution, names: tuple[str, ...]) -> dict[str, slice]:
    out = {}
    start = 0
    for n in names:
        con = dist.arg_constraints[n]
        edim = int(getattr(con, "event_dim", 0))
        v = torch.as_tensor(getattr(dist, n))
        ev: tuple[int, ...] = tuple(v.shape[v.dim() - edim :]) if edim else ()
        if isinstance(con, (type(C.positive_definite), type(C.lower_cholesky))):
            size = ev[-1] * (ev[-1] + 1) // 2
        else:
            size = math.prod(ev)
        out[n] = slice(start, start + size)
        start += size
    return out


def _select(f: Tensor, slices: dict[str, slice], wrt: tuple[str, ...]) -> Tensor:
    idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in wrt])
    return f[..., idx[:, None], idx[None, :]]


def _closed_form(fam: Family) -> Tensor | None:
    fn = CLOSED_FORMS.get(fam.dist_cls)
    if fn is None:
        return None
    names, f = fn(fam.dist, fam.given)
    if not set(fam.wrt) <= set(names):
        return None
    f = f.expand(*fam.batch_shape, *f.shape[-2:])
    return _select(f, _name_slices(fam.dist, names), fam.wrt)


def _method_auto(fam: Family) -> Tensor:
    f = _closed_form(fam)
    return f if f is not None else _generic(fam, fam.theta, "auto").information


def _method_closed(fam: Family) -> Tensor:
    f = _closed_form(fam)
    if f is None:
        raise ValueError(
            f"no closed form covers {fam.dist_cls.__name__} wrt {list(fam.wrt)}; registered "
            f"families: {sorted(c.__name__ for c in CLOSED_FORMS)} (use method='generic')"
        )
    return f


def _method_generic(fam: Family) -> Tensor:
    return _generic(fam, fam.theta, "auto").information


METHODS: dict[str, Callable[[Family], Tensor]] = {
    "auto": _method_auto,
    "closed_form": _method_closed,
    "generic": _method_generic,
}


def fisher_information(
    dist_cls: type[Distribution],
    wrt: str | Iterable[str] | None = None,
    *,
    method: str = "auto",
    **params: Any,
) -> Tensor:
    """Expected (per-observation) Fisher information of a distribution family.

    F(θ)ᵢⱼ = E_{X∼p_θ}[∂ᵢ log p(X|θ) ∂ⱼ log p(X|θ)], with θ the parameters named
    in ``wrt`` in the parameterisation given to the constructor (``probs`` or
    ``logits``, ``covariance_matrix`` …). Other given parameters are held
    fixed (e.g. Binomial ``total_count``, StudentT ``df``).

    Parameterisation details: vector parameters keep their entries; symmetric
    matrices (``covariance_matrix``, ``precision_matrix``) use their
    ``d(d+1)/2`` lower-triangular entries in ``torch.tril_indices`` order, an
    off-diagonal coordinate moving both Σᵢⱼ and Σⱼᵢ; ``scale_tril`` uses its
    lower-triangular entries. Categorical ``probs`` are the raw input that
    torch normalises, so their Fisher diag(1/p) − 11ᵀ is singular along p.

    Args:
        dist_cls: a ``torch.distributions.Distribution`` subclass.
        wrt: parameter name(s) to differentiate; default: all given
            continuous parameters, in the order given.
        method: ``"auto"`` (closed form if registered, else generic),
            ``"closed_form"`` or ``"generic"``.
        **params: constructor arguments; batched values give batched matrices.

    Returns:
        Tensor of shape ``batch_shape + (m, m)`` in ``wrt`` order.

    Raises:
        TypeError: ``dist_cls`` is not a distribution class, or an unknown
            constructor argument was passed.
        ValueError: a parameter violates its constraint, ``wrt`` is invalid,
            the support depends on the parameters (e.g. Uniform), ``method``
            is unknown, or no closed form applies and the generic quadrature's
            error estimate is not small (see :func:`fisher_information_generic`).

    Example:
        >>> import torch
        >>> fisher_information(torch.distributions.Bernoulli, probs=0.3)  # 1/(p(1-p))
        tensor([[4.7619]])
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    fam = prepare_family(dist_cls, wrt, params)
    return METHODS[method](fam)
