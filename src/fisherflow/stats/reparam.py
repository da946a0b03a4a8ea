"""Fisher information under a change of parameters.

If θ = g(φ) then F_φ(φ) = Jᵀ F_θ(g(φ)) J with J = ∂θ/∂φ (Lehmann & Casella
1998, §2.7; Amari & Nagaoka 2000, §2.1): the Fisher information is a
(0, 2)-tensor, so its entries change but the quadratic form δθᵀ F_θ δθ does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from fisherflow.stats._params import check_dist_cls, prepare_family
from fisherflow.stats.information import fisher_information

__all__ = [
    "change_parameterization",
    "model_fisher_information",
    "parameter_jacobian",
    "reparameterize",
]


def reparameterize(information: Tensor, jacobian: Tensor) -> Tensor:
    """Pull a Fisher matrix back through a Jacobian: Jᵀ F J.

    Args:
        information: F in the old coordinates θ, shape ``batch + (k, k)``.
        jacobian: J = ∂θ/∂φ, shape ``batch + (k, k')`` (broadcasts).

    Returns:
        Fisher information in the new coordinates φ, shape ``batch + (k', k')``.

    Raises:
        TypeError: arguments are not tensors.
        ValueError: shapes are incompatible.

    Example:
        >>> import torch
        >>> F = torch.tensor([[6.25]])  # Bernoulli at p = 0.2: 1/(p(1-p))
        >>> J = torch.tensor([[0.16]])  # dp/dlogit = p(1-p)
        >>> reparameterize(F, J)  # p(1-p) = 0.16
        tensor([[0.1600]])
    """
    if not isinstance(information, Tensor) or not isinstance(jacobian, Tensor):
        raise TypeError(
            "information and jacobian must be tensors, got "
            f"{type(information).__name__} and {type(jacobian).__name__}"
        )
    if information.dim() < 2 or information.shape[-1] != information.shape[-2]:
        raise ValueError(
            f"information must have shape batch + (k, k), got {tuple(information.shape)}"
        )
    if jacobian.dim() < 2 or jacobian.shape[-2] != information.shape[-1]:
        raise ValueError(
            "jacobian must have shape batch + (k, k') with k = information.shape[-1] = "
            f"{information.shape[-1]}, got {tuple(jacobian.shape)}"
        )
    return jacobian.transpose(-1, -2) @ information @ jacobian


def _jacobian_batched(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Jacobian of an elementwise-in-batch map x (batch + (n,)) → y (batch + (k,))."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        rows = []
        for i in range(y.shape[-1]):
            (g,) = torch.autograd.grad(y[..., i].sum(), x, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(x) if g is None else g)
    return torch.stack(rows, -2)


def parameter_jacobian(
    dist_cls: type[Distribution],
    to: str | Iterable[str],
    wrt: str | Iterable[str] | None = None,
    **params: Any,
) -> Tensor:
    """Jacobian ∂θ/∂φ between two named parameterisations of one family.

    θ are the parameters ``wrt`` of the given ``params`` (e.g. ``probs``);
    φ are the names in ``to`` (e.g. ``logits``), evaluated at the same
    distribution by reading the family's own attributes (``dist.logits``), and
    mapped back through the family's constructor — so any pair the
    ``torch.distributions`` class converts between is supported
    (probs ↔ logits, covariance_matrix ↔ precision_matrix ↔ scale_tril).

    Args:
        dist_cls: a ``torch.distributions.Distribution`` subclass.
        to: names of the new parameterisation.
        wrt: names of the old one; default every given continuous parameter.
        **params: the old parameterisation's values.

    Returns:
        J of shape ``batch + (m_old, m_new)``.

    Raises:
        ValueError: ``to`` names parameters the family does not have.

    Example:
        >>> import torch
        >>> J = parameter_jacobian(torch.distributions.Bernoulli, "logits", probs=0.2)
        >>> round(J.item(), 6)  # dp/dlogit = p(1-p)
        0.16
    """
    fam = prepare_family(dist_cls, wrt, params)
    to_t = (to,) if isinstance(to, str) else tuple(to)
    new_values: dict[str, Any] = {}
    for n in to_t:
        if n not in fam.dist.arg_constraints or not hasattr(fam.dist, n):
            raise ValueError(
                f"to names unknown parameter {n!r} of {fam.dist_cls.__name__}; "
                f"valid names: {sorted(fam.dist.arg_constraints)}"
            )
        new_values[n] = getattr(fam.dist, n)
    keep = {k: v for k, v in params.items() if k not in fam.wrt}
    new = prepare_family(dist_cls, to_t, {**keep, **new_values})

    def old_of_new(phi: Tensor) -> Tensor:
        d = new.build(phi)
        return fam.flatten({n: getattr(d, n) for n in fam.wrt})

    return _jacobian_batched(old_of_new, new.theta)


def change_parameterization(
    information: Tensor,
    dist_cls: type[Distribution],
    to: str | Iterable[str],
    wrt: str | Iterable[str] | None = None,
    **params: Any,
) -> Tensor:
    """Express a Fisher matrix in another named parameterisation (Jᵀ F J).

    Args:
        information: Fisher matrix in the ``wrt`` parameterisation.
        dist_cls: the family.
        to: names of the new parameterisation (e.g. ``"logits"``).
        wrt: names of the current one; default every given continuous parameter.
        **params: the point, in the current parameterisation.

    Returns:
        The Fisher matrix with respect to ``to``.

    Raises:
        ValueError: invalid names or shapes.

    Example:
        >>> import torch
        >>> from torch.distributions import Bernoulli
        >>> F = fisher_information(Bernoulli, probs=0.2)  # 6.25
        >>> change_parameterization(F, Bernoulli, "logits", probs=0.2)  # p(1-p)
        tensor([[0.1600]])
    """
    return reparameterize(information, parameter_jacobian(dist_cls, to, wrt, **params))


def model_fisher_information(
    dist_cls: type[Distribution],
    param_fn: Callable[[Tensor], Mapping[str, Tensor]],
    theta: Tensor,
) -> Tensor:
    """Fisher information of a model θ ↦ p(· | params(θ)) by the chain rule.

    F(θ) = Jᵀ F_params J with J = ∂params/∂θ by autograd and F_params the
    family's Fisher (closed form where registered). Useful for curved or
    non-identifiable models, e.g. N(θ₁³, 1) whose Fisher is
    [[9θ₁⁴, 0], [0, 0]] (see :func:`fisherflow.stats.fisher_rank`).

    Args:
        dist_cls: the family.
        param_fn: maps a 1-D θ to constructor arguments (tensors; those that
            do not depend on θ are held fixed).
        theta: 1-D parameter vector.

    Returns:
        Fisher matrix of shape ``(len(theta), len(theta))``.

    Raises:
        TypeError: ``theta`` is not a tensor or ``param_fn`` not callable.
        ValueError: ``theta`` is not 1-D.

    Example:
        >>> import torch
        >>> from torch.distributions import Normal
        >>> t = torch.tensor([1.0, 5.0], dtype=torch.float64)
        >>> F = model_fisher_information(Normal, lambda t: {"loc": t[0] ** 3,
        ...     "scale": torch.tensor(1.0, dtype=t.dtype)}, t)
        >>> F.tolist()  # [[9θ₁⁴, 0], [0, 0]]
        [[9.0, 0.0], [0.0, 0.0]]
    """
    check_dist_cls(dist_cls)
    if not isinstance(theta, Tensor):
        raise TypeError(f"theta must be a tensor, got {type(theta).__name__}")
    if theta.dim() != 1:
        raise ValueError(f"theta must be 1-D, got shape {tuple(theta.shape)}")
    if not callable(param_fn):
        raise TypeError(f"param_fn must be callable, got {param_fn!r}")
    with torch.no_grad():
        values: dict[str, Any] = dict(param_fn(theta.detach()))
    x = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = dict(param_fn(x))
        wrt = tuple(n for n, v in out.items() if isinstance(v, Tensor) and v.requires_grad)
    if not wrt:
        return theta.new_zeros(theta.shape[0], theta.shape[0])
    fam = prepare_family(dist_cls, wrt, values)
    f = fisher_information(dist_cls, wrt, **values)

    def flat(t: Tensor) -> Tensor:
        return fam.flatten(dict(param_fn(t)))

    jac = torch.autograd.functional.jacobian(flat, theta.detach())
    return reparameterize(f, jac)
