"""Data-space scores: Fisher divergence, location Fisher information, score matching.

Here the score is ∇ₓ log p(x) — a derivative in the *data*, not the parameter.

References:
    Hyvärinen (2005), "Estimation of non-normalized statistical models by score
    matching", JMLR 6; Stam (1959), "Some inequalities satisfied by the
    quantities of information of Fisher and Shannon", Inf. Control 2;
    Cover & Thomas (2006), *Elements of Information Theory*, §17.7 (de Bruijn).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from fisherflow.stats._quadrature import de_integrate

__all__ = [
    "data_score",
    "differential_entropy",
    "fisher_divergence",
    "location_fisher_information",
    "score_matching_loss",
]

LogDensity = Callable[[Tensor], Tensor]


def _log_density(p: Distribution | LogDensity, name: str) -> LogDensity:
    if isinstance(p, Distribution):
        return p.log_prob
    if callable(p):
        return p
    raise TypeError(f"{name} must be a Distribution or a callable x ↦ log p(x), got {p!r}")


def _event_dims(x: Tensor, log_p: Tensor) -> int:
    return x.dim() - log_p.dim()


def data_score(p: Distribution | LogDensity, x: Tensor, *, create_graph: bool = False) -> Tensor:
    """Data score ∇ₓ log p(x) by autograd (normalising constants drop out).

    Args:
        p: a distribution or a callable returning (unnormalised) log-densities.
        x: points, shape ``sample + event``.
        create_graph: keep the graph (for losses that are differentiated again).

    Returns:
        Tensor shaped like ``x``.

    Raises:
        TypeError: ``p`` is neither a distribution nor callable.

    Example:
        >>> import torch
        >>> n = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(2.0))
        >>> data_score(n, torch.tensor([3.0]))  # −(x−μ)/σ²
        tensor([-0.5000])
    """
    f = _log_density(p, "p")
    xr = x.detach().clone().requires_grad_(True) if not x.requires_grad else x
    with torch.enable_grad():
        lp = f(xr)
        (g,) = torch.autograd.grad(lp.sum(), xr, create_graph=create_graph)
    return g


def fisher_divergence(
    p: Distribution | LogDensity, q: Distribution | LogDensity, samples: Tensor
) -> Tensor:
    """Fisher divergence D_F(p‖q) = E_p ‖∇ₓ log p(X) − ∇ₓ log q(X)‖².

    Estimated by the sample mean over ``samples`` (draws from p). Unlike KL it
    needs only scores, so both p and q may be unnormalised. (Some authors put
    a factor ½ in front; this function does not.)

    Args:
        p: the data distribution (or its unnormalised log-density).
        q: the model.
        samples: draws from p, shape ``(n,) + event``.

    Returns:
        Scalar tensor.

    Raises:
        TypeError: p or q is neither a distribution nor callable.
        ValueError: ``samples`` is empty.

    Example:
        >>> import torch
        >>> from torch.distributions import Normal
        >>> x = torch.linspace(-3, 3, 7)
        >>> # equal variances: the score difference is constant (μ₁−μ₂)/σ²
        >>> fisher_divergence(Normal(0.0, 1.0), Normal(0.5, 1.0), x)
        tensor(0.2500)
    """
    if not isinstance(samples, Tensor) or samples.numel() == 0:
        raise ValueError(f"samples must be a non-empty tensor, got {samples!r}")
    sp = data_score(p, samples)
    sq = data_score(q, samples)
    lp = _log_density(p, "p")(samples)
    d = (sp - sq) ** 2
    d = d.reshape(*lp.shape, -1).sum(-1)
    return d.mean()


def _check_1d(dist: Distribution) -> None:
    if not isinstance(dist, Distribution):
        raise TypeError(f"dist must be a torch.distributions instance, got {dist!r}")
    support: Any = dist.support
    if dist.event_shape != torch.Size([]) or support.is_discrete:
        raise ValueError(
            "a continuous univariate distribution is needed (event_shape () and continuous "
            f"support), got {type(dist).__name__} with event_shape {tuple(dist.event_shape)}"
        )


def location_fisher_information(dist: Distribution) -> Tensor:
    """Fisher information of a location family, J(X) = ∫ p′(x)² / p(x) dx.

    J(X) = E[(d/dx log p(X))²] is the Fisher information of θ in p(x − θ); for
    N(μ, σ²) it is 1/σ². Computed by double-exponential quadrature.

    Args:
        dist: continuous univariate distribution (may be batched, e.g. a
            ``MixtureSameFamily`` of Normals).

    Returns:
        Tensor of shape ``batch_shape``.

    Raises:
        TypeError: not a distribution.
        ValueError: not continuous and univariate.

    Example:
        >>> import torch
        >>> n = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
        ...                                torch.tensor(2.0, dtype=torch.float64))
        >>> round(location_fisher_information(n).item(), 12)  # 1/σ²
        0.25
    """
    _check_1d(dist)

    def integrand(x: Tensor) -> Tensor:
        return data_score(dist, x) ** 2

    return de_integrate(dist, integrand)[0]


def differential_entropy(dist: Distribution) -> Tensor:
    """Differential entropy h(X) = −∫ p log p by quadrature (for any 1-D density).

    Args:
        dist: continuous univariate distribution.

    Returns:
        Tensor of shape ``batch_shape`` (nats).

    Raises:
        TypeError: not a distribution.
        ValueError: not continuous and univariate.

    Example:
        >>> import math, torch
        >>> n = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
        ...                                torch.tensor(1.0, dtype=torch.float64))
        >>> abs(differential_entropy(n).item() - 0.5 * math.log(2 * math.pi * math.e)) < 1e-12
        True
    """
    _check_1d(dist)
    return de_integrate(dist, lambda x: -dist.log_prob(x))[0]


def score_matching_loss(log_density: LogDensity, x: Tensor) -> Tensor:
    """Hyvärinen score-matching loss E[½‖∇ₓ log q(x)‖² + Δₓ log q(x)].

    For data x ∼ p and a model q known up to a constant, this equals
    ½ D_F(p‖q) minus a constant independent of q (Hyvärinen 2005, Thm. 1), so
    minimising it fits q without its normaliser. The graph is kept so the
    loss can be minimised over q's parameters.

    Args:
        log_density: ``x ↦ log q(x)`` up to an additive constant; takes
            ``(n, d)`` (or ``(n,)`` for 1-D data) and returns ``(n,)``.
        x: data, shape ``(n,)`` or ``(n, d)``.

    Returns:
        Scalar tensor (differentiable in the model's parameters).

    Raises:
        TypeError: ``log_density`` is not callable.
        ValueError: ``x`` is not 1-D or 2-D.

    Example:
        >>> import torch
        >>> x = torch.tensor([-1.0, 1.0])
        >>> # q = N(0, 1) unnormalised: ½x² − 1 averaged over x = ±1
        >>> score_matching_loss(lambda x: -0.5 * x**2, x).detach()
        tensor(-0.5000)
    """
    if not callable(log_density):
        raise TypeError(f"log_density must be callable, got {log_density!r}")
    if not isinstance(x, Tensor) or x.dim() not in (1, 2):
        raise ValueError(f"x must be a tensor of shape (n,) or (n, d), got {x!r}")
    xr = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        lp = log_density(xr)
        (g,) = torch.autograd.grad(lp.sum(), xr, create_graph=True)
        if x.dim() == 1:
            (lap,) = torch.autograd.grad(g.sum(), xr, create_graph=True)
            sq = g**2
        else:
            lap = torch.zeros_like(lp)
            for i in range(x.shape[1]):
                (h,) = torch.autograd.grad(g[:, i].sum(), xr, create_graph=True)
                lap = lap + h[:, i]
            sq = (g**2).sum(-1)
    return (0.5 * sq + lap).mean()
