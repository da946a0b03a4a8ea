"""Fisher–Rao distance: closed forms and a numerical geodesic.

The Fisher–Rao distance is the geodesic distance of the Riemannian metric
ds² = dθᵀ F(θ) dθ (Rao 1945; Atkinson & Mitchell 1981, "Rao's distance measure",
Sankhyā A 43; Costa, Santos & Strapasson 2015, "Fisher information distance: a
geometrical reading", Discrete Appl. Math. 197).

Closed forms (registered per class with :func:`register_fisher_rao`):

* Categorical / Bernoulli: 2 arccos Σᵢ √(pᵢ qᵢ);  Binomial(n): √n × Bernoulli;
* Geometric: 2 |artanh √(1−p) − artanh √(1−q)|;
* Poisson: 2 |√λ − √μ|;  Exponential: |log(λ/μ)|;
* Normal (μ, σ): √2 · arccosh(1 + ((μ₁−μ₂)²/2 + (σ₁−σ₂)²) / (2σ₁σ₂))
  (a scaled Poincaré half-plane);  Laplace (μ, b): the half-plane with scale 1;
  StudentT (μ, σ) at a shared ν: √(2ν/(ν+3)) × half-plane with μ scaled by
  √((ν+1)/(2ν));
* MultivariateNormal with a shared covariance: the Mahalanobis distance.

Other families with one or two scalar parameters use :func:`fisher_rao_geodesic`,
which minimises the discrete path energy N Σᵢ Δzᵢᵀ G(z̄ᵢ) Δzᵢ in unconstrained
coordinates z (``transform_to`` of each parameter's constraint) with L-BFGS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Binomial,
    Categorical,
    Distribution,
    Exponential,
    Geometric,
    Laplace,
    MultivariateNormal,
    Normal,
    Poisson,
    StudentT,
    transform_to,
)

from fisherflow.stats._params import check_int, instance_params, prepare_family
from fisherflow.stats._registry import CLOSED_FORMS
from fisherflow.stats.information import _closed_form, _generic, _name_slices, _select

__all__ = [
    "FISHER_RAO_CLOSED_FORMS",
    "Geodesic",
    "fisher_rao_distance",
    "fisher_rao_geodesic",
    "register_fisher_rao",
]

DistanceFn = Callable[[Any, Any], Tensor]
FISHER_RAO_CLOSED_FORMS: dict[type[Distribution], DistanceFn] = {}


def register_fisher_rao(dist_cls: type[Distribution]) -> Callable[[DistanceFn], DistanceFn]:
    """Register a closed-form Fisher–Rao distance ``fn(p, q) -> Tensor`` for ``dist_cls``.

    Args:
        dist_cls: a ``torch.distributions.Distribution`` subclass.

    Returns:
        The decorator.
    """

    def deco(fn: DistanceFn) -> DistanceFn:
        FISHER_RAO_CLOSED_FORMS[dist_cls] = fn
        return fn

    return deco


def _same(name: str, a: Tensor, b: Tensor, family: str) -> None:
    if not torch.equal(*torch.broadcast_tensors(torch.as_tensor(a), torch.as_tensor(b))):
        raise ValueError(
            f"the {family} Fisher–Rao closed form needs equal {name} for p and q, "
            f"got {torch.as_tensor(a).tolist()} and {torch.as_tensor(b).tolist()}"
        )


def _bhattacharyya_angle(p: Tensor, q: Tensor) -> Tensor:
    bc = (p * q).sqrt().sum(-1).clamp(-1.0, 1.0)
    return 2.0 * torch.arccos(bc)


def _two_point(p: Tensor) -> Tensor:
    return torch.stack([p, 1 - p], -1)


@register_fisher_rao(Categorical)
def _fr_categorical(p: Any, q: Any) -> Tensor:
    return _bhattacharyya_angle(p.probs, q.probs)


@register_fisher_rao(Bernoulli)
def _fr_bernoulli(p: Any, q: Any) -> Tensor:
    # 2|arcsin√p − arcsin√q| written as an angle between √-embeddings
    return (2 * (torch.arcsin(p.probs.sqrt()) - torch.arcsin(q.probs.sqrt()))).abs()


@register_fisher_rao(Binomial)
def _fr_binomial(p: Any, q: Any) -> Tensor:
    _same("total_count", p.total_count, q.total_count, "Binomial")
    return p.total_count.sqrt() * _fr_bernoulli(p, q)


@register_fisher_rao(Geometric)
def _fr_geometric(p: Any, q: Any) -> Tensor:
    return 2 * (torch.atanh((1 - p.probs).sqrt()) - torch.atanh((1 - q.probs).sqrt())).abs()


@register_fisher_rao(Poisson)
def _fr_poisson(p: Any, q: Any) -> Tensor:
    return 2 * (p.rate.sqrt() - q.rate.sqrt()).abs()


@register_fisher_rao(Exponential)
def _fr_exponential(p: Any, q: Any) -> Tensor:
    return (p.rate.log() - q.rate.log()).abs()


def _half_plane(dx: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """Poincaré half-plane distance between (x₁, s₁) and (x₂, s₂) with dx = x₁ − x₂."""
    arg = 1 + (dx**2 + (s1 - s2) ** 2) / (2 * s1 * s2)
    return torch.arccosh(arg.clamp_min(1.0))


@register_fisher_rao(Normal)
def _fr_normal(p: Any, q: Any) -> Tensor:
    return math.sqrt(2) * _half_plane((p.loc - q.loc) / math.sqrt(2), p.scale, q.scale)


@register_fisher_rao(Laplace)
def _fr_laplace(p: Any, q: Any) -> Tensor:
    return _half_plane(p.loc - q.loc, p.scale, q.scale)


@register_fisher_rao(StudentT)
def _fr_student_t(p: Any, q: Any) -> Tensor:
    _same("df", p.df, q.df, "StudentT (loc, scale)")
    nu = p.df
    c = 2 * nu / (nu + 1)
    return (2 * nu / (nu + 3)).sqrt() * _half_plane((p.loc - q.loc) / c.sqrt(), p.scale, q.scale)


@register_fisher_rao(MultivariateNormal)
def _fr_mvn(p: Any, q: Any) -> Tensor:
    _same("covariance_matrix", p.covariance_matrix, q.covariance_matrix, "MultivariateNormal")
    diff = (p.loc - q.loc)[..., None]
    sol = torch.linalg.solve_triangular(p.scale_tril, diff, upper=False)
    return sol.squeeze(-1).norm(dim=-1)


def _check_pair(p: object, q: object) -> None:
    if not isinstance(p, Distribution) or not isinstance(q, Distribution):
        raise TypeError(
            f"p and q must be torch.distributions instances, got {type(p).__name__} "
            f"and {type(q).__name__}"
        )
    if type(p) is not type(q):
        raise TypeError(
            "the Fisher–Rao distance is defined within one family; got "
            f"{type(p).__name__} and {type(q).__name__}"
        )


def fisher_rao_distance(p: Distribution, q: Distribution, *, method: str = "auto") -> Tensor:
    """Fisher–Rao geodesic distance between two members of one family.

    Args:
        p: a ``torch.distributions`` instance.
        q: an instance of the same class (batch shapes broadcast for closed forms).
        method: ``"auto"`` (closed form if registered, else numerical),
            ``"closed_form"`` or ``"numerical"`` (:func:`fisher_rao_geodesic`,
            unbatched, 1 or 2 scalar parameters).

    Returns:
        Tensor of the broadcast batch shape.

    Raises:
        TypeError: p, q are not instances of one family.
        ValueError: unknown ``method``, no closed form, or parameters the
            closed form needs equal (e.g. a shared covariance) differ.

    Example:
        >>> import torch
        >>> from torch.distributions import Poisson
        >>> fisher_rao_distance(Poisson(torch.tensor(1.0)), Poisson(torch.tensor(4.0)))  # 2|√1−√4|
        tensor(2.)
    """
    _check_pair(p, q)
    if method not in ("auto", "closed_form", "numerical"):
        raise ValueError(
            f"method must be one of ['auto', 'closed_form', 'numerical'], got {method!r}"
        )
    fn = FISHER_RAO_CLOSED_FORMS.get(type(p))
    if method == "numerical" or (method == "auto" and fn is None):
        return fisher_rao_geodesic(p, q).distance
    if fn is None:
        raise ValueError(
            f"no closed-form Fisher–Rao distance for {type(p).__name__}; registered: "
            f"{sorted(c.__name__ for c in FISHER_RAO_CLOSED_FORMS)} (use method='numerical')"
        )
    return fn(p, q)


def _resample(path: Tensor, nseg: int) -> Tensor:
    """Linear interpolation of a path (n+1, m) at nseg+1 equally spaced parameters."""
    old = path.shape[0] - 1
    s = torch.linspace(0, old, nseg + 1, dtype=path.dtype)
    i = s.floor().long().clamp(max=old - 1)
    w = (s - i)[:, None]
    return (1 - w) * path[i] + w * path[i + 1]


def _minimise_energy(
    path: Tensor, pieces: Callable[[Tensor], tuple[Tensor, Tensor]], max_iter: int
) -> tuple[Tensor, bool]:
    nseg = path.shape[0] - 1
    z0, z1 = path[0], path[-1]
    inner = path[1:-1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [inner],
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        full = torch.cat([z0[None], inner, z1[None]])
        energy = nseg * pieces(full)[1].sum()
        energy.backward()
        return energy

    opt.step(closure)
    n_iter = int(opt.state[inner].get("n_iter", 0))
    return torch.cat([z0[None], inner.detach(), z1[None]]), n_iter < max_iter


@dataclass(frozen=True)
class Geodesic:
    """A numerical Fisher–Rao geodesic.

    Attributes:
        distance: its length (scalar tensor).
        path: points along it, shape ``(num_points + 1, m)`` in ``wrt`` order.
        wrt: parameter names of the path's columns.
        converged: whether the optimiser met its tolerance.
    """

    distance: Tensor
    path: Tensor
    wrt: tuple[str, ...]
    converged: bool


def fisher_rao_geodesic(
    p: Distribution,
    q: Distribution,
    wrt: str | Iterable[str] | None = None,
    *,
    num_points: int = 64,
    max_iter: int = 500,
) -> Geodesic:
    """Numerical Fisher–Rao geodesic by path-energy minimisation.

    The path has ``num_points`` segments in unconstrained coordinates z; its
    discrete energy N Σ Δzᵀ G(z̄) Δz (G = JᵀFJ at segment midpoints) is
    minimised by L-BFGS with the end points fixed (coarse-to-fine from 8
    segments); the distance is the length Σ √(Δzᵀ G Δz), Richardson-extrapolated
    from N/2 and N segments (the midpoint-rule error is O(N⁻²)). One-parameter
    families need no optimisation.
    The metric uses the closed-form Fisher when registered, else the generic
    autograd path (with a differentiable graph).

    Args:
        p: start distribution (unbatched).
        q: end distribution of the same class.
        wrt: the 1 or 2 scalar parameters spanning the manifold; default every
            continuous constructor parameter (others must agree between p and q).
        num_points: number of path segments (≥ 2).
        max_iter: L-BFGS iteration cap per refinement level.

    Returns:
        A :class:`Geodesic`.

    Raises:
        TypeError: p and q are not of one family.
        ValueError: batched inputs, more than two parameters, non-scalar
            parameters, or fixed parameters that differ between p and q.

    Example:
        >>> import torch
        >>> from torch.distributions import Exponential
        >>> g = fisher_rao_geodesic(Exponential(torch.tensor(1.0, dtype=torch.float64)),
        ...                         Exponential(torch.tensor(5.0, dtype=torch.float64)))
        >>> abs(g.distance.item() - torch.log(torch.tensor(5.0)).item()) < 1e-4  # |log(λ/μ)|
        True
    """
    _check_pair(p, q)
    check_int("num_points", num_points, 2)
    cls = type(p)
    pp, _ = instance_params(p, wrt)
    qp, _ = instance_params(q, wrt)
    fam_p = prepare_family(cls, wrt, pp)
    fam_q = prepare_family(cls, fam_p.wrt, qp)
    if fam_p.batch_shape != torch.Size([]) or fam_q.batch_shape != torch.Size([]):
        raise ValueError("fisher_rao_geodesic needs unbatched p and q")
    if not 1 <= len(fam_p.wrt) <= 2 or any(s.size != 1 for s in fam_p.slots):
        raise ValueError(
            "the numerical geodesic supports 1 or 2 scalar parameters; got "
            f"{list(fam_p.wrt)} (pass wrt=... and hold the rest fixed)"
        )
    for n, v in fam_p.fixed.items():
        _same(n, v, fam_q.fixed[n], f"{cls.__name__} geodesic (fixed parameter)")
    cons = fam_p.dist.arg_constraints
    trs = [transform_to(cons[n]) for n in fam_p.wrt]
    dtype = fam_p.theta.dtype
    z0 = torch.stack([tr.inv(fam_p.theta[i]) for i, tr in enumerate(trs)])
    z1 = torch.stack([tr.inv(fam_q.theta[i]) for i, tr in enumerate(trs)])
    s = torch.linspace(0, 1, num_points + 1, dtype=dtype)[:, None]
    line = z0 + s * (z1 - z0)
    fixed = fam_p.fixed
    use_closed = _closed_form(fam_p) is not None

    def metric(z: Tensor) -> Tensor:
        cols = [tr(z[:, i]) for i, tr in enumerate(trs)]
        jac = torch.stack(
            [tr.log_abs_det_jacobian(z[:, i], cols[i]).exp() for i, tr in enumerate(trs)], -1
        )
        params = dict(fixed)
        params.update({n: c for n, c in zip(fam_p.wrt, cols, strict=True)})
        if use_closed:
            ctor: Any = cls
            d = ctor(**params, validate_args=False)
            names, full = CLOSED_FORMS[cls](d, fam_p.given)
            f = _select(full, _name_slices(d, names), fam_p.wrt)
        else:
            fam = prepare_family(cls, fam_p.wrt, params)
            f = _generic(fam, fam.theta, "auto", create_graph=True).information
        return jac[:, :, None] * f * jac[:, None, :]

    def pieces(path: Tensor) -> tuple[Tensor, Tensor]:
        dz = path[1:] - path[:-1]
        g = metric(0.5 * (path[1:] + path[:-1]))
        return dz, (dz[:, None, :] @ g @ dz[:, :, None])[:, 0, 0]

    def length(path: Tensor) -> Tensor:
        with torch.no_grad():
            return pieces(path)[1].clamp_min(0).sqrt().sum()

    converged = True
    half = _resample(line, num_points // 2)
    if len(fam_p.wrt) == 2:
        # coarse-to-fine: the discrete energy's conditioning grows like N², so
        # solve on 8 segments, interpolate, and refine up to num_points.
        sizes = [num_points]
        while sizes[-1] > 8:
            sizes.append(max(8, sizes[-1] // 2))
        coarse = z0 + torch.linspace(0, 1, sizes[-1] + 1, dtype=dtype)[:, None] * (z1 - z0)
        for k, nseg in enumerate(reversed(sizes)):
            if k:
                coarse = _resample(coarse, nseg)
            coarse, ok = _minimise_energy(coarse, pieces, max_iter)
            converged = converged and ok
            if nseg == num_points // 2:
                half = coarse
        line = coarse
    # Richardson extrapolation of the O(N⁻²) midpoint-rule length.
    fine, rough = length(line), length(half)
    dist = (4 * fine - rough) / 3 if 2 * (half.shape[0] - 1) == num_points else fine
    with torch.no_grad():
        path = torch.stack([tr(line[:, i]) for i, tr in enumerate(trs)], -1)
    return Geodesic(dist.detach(), path.detach(), fam_p.wrt, converged)
