"""Fusion of independent estimates, plain and robust.

Plain fusion of independent ``(θᵢ, Iᵢ)`` is information-weighted:
``I = Σ Iᵢ``, ``θ = I⁻¹ Σ Iᵢ θᵢ`` — exact for Gaussian likelihoods, asymptotically
efficient in general, and ruined by one source that lies (a wrong θ with a huge
information claim dominates). :func:`robust_fuse` bounds that influence.

References:
    Weiszfeld (1937), *Sur le point pour lequel la somme des distances de n points
    donnés est minimum*; Vardi & Zhang (2000), *The multivariate L1-median and
    associated data depth*, PNAS 97 (the modified Weiszfeld step); Lopuhaä &
    Rousseeuw (1991), *Breakdown points of affine equivariant estimators*, Ann. Stat.
    (breakdown of the spatial median); Rousseeuw & Leroy (1987), *Robust Regression
    and Outlier Detection* (one-step reweighting after a robust start).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from fisherflow.flow._common import (
    RankDeficiencyWarning,
    check_real,
    grouped_layout,
    param_layout,
)
from fisherflow.flow._information import as_information
from fisherflow.flow.state import Estimate, FisherFlow
from fisherflow.flow.weighting import fuse_information
from fisherflow.matrices import FisherMatrix, ParamLayout, Vector

__all__ = [
    "LOCATIONS",
    "Downweight",
    "RobustFusion",
    "coordinate_median",
    "fuse",
    "robust_fuse",
    "trimmed_mean",
    "weiszfeld",
]


# ------------------------------------------------------------------ parsing
def parse_estimates(
    estimates: Iterable[Any],
) -> tuple[list[Tensor], list[FisherMatrix], ParamLayout, Callable[[Tensor], Vector], str]:
    """Flat parameters, information, common layout, output form and structure."""
    items = list(estimates) if not isinstance(estimates, Tensor) else None
    if items is None or not items:
        raise ValueError("estimates must be a non-empty sequence of (params, information) pairs")
    thetas: list[Tensor] = []
    infos: list[FisherMatrix] = []
    layout: ParamLayout | None = None
    form: Callable[[Tensor], Vector] | None = None
    structure = "dense"
    for i, item in enumerate(items):
        if isinstance(item, FisherFlow):
            params, info = item.params, item.information
        elif isinstance(item, Estimate):
            params, info = item.params, item.information
        elif isinstance(item, tuple) and len(item) == 2:
            params, info = item
        else:
            raise TypeError(
                f"estimates[{i}] must be an Estimate, a FisherFlow or a (params, information) "
                f"pair, got {type(item).__name__}"
            )
        lay, shape = param_layout(params, f"estimates[{i}] params")
        flat = params.reshape(-1) if isinstance(params, Tensor) else lay.flatten(params)
        if layout is None and shape is not None:
            lay = grouped_layout(lay, info)
        if layout is None:
            layout = lay
            form = (lambda t, s=shape: t.reshape(s)) if shape is not None else lay.unflatten
            if isinstance(info, FisherMatrix):
                structure = info.structure
            elif isinstance(info, Tensor) and info.dim() == 1:
                structure = "diagonal"
        elif lay.size != layout.size or (isinstance(params, Mapping) and lay != layout):
            raise ValueError(
                f"estimates[{i}] has layout {lay.to_json()}, expected {layout.to_json()}"
            )
        dtype = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float64
        if not torch.isfinite(flat).all():
            raise ValueError(f"estimates[{i}] params contain NaN or Inf")
        thetas.append(flat.detach().to(dtype))
        infos.append(as_information(info, layout, structure, f"estimates[{i}] information", dtype))
    assert layout is not None and form is not None
    dtype = torch.promote_types(thetas[0].dtype, infos[0].dtype)
    thetas = [t.to(dtype) for t in thetas]
    return thetas, infos, layout, form, structure


def fuse(estimates: Iterable[Any]) -> Estimate:
    r"""Information-weighted fusion of independent estimates.

    ``I = Σᵢ Iᵢ`` and ``θ = I⁻¹ Σᵢ Iᵢ θᵢ`` (sums in the order given; a pseudo-inverse,
    with a :class:`RankDeficiencyWarning`, when ``I`` is singular), by
    :func:`fisherflow.flow.weighting.fuse_information`. Every structure of
    :data:`fisherflow.matrices.STRUCTURES` is accepted and kept; ``Σ Iᵢ`` is the
    structure's own sum, exact for dense, diagonal and block, for EKFAC in a shared
    basis and for K-FAC with equal input factors (see :mod:`fisherflow.flow.weighting`).

    Args:
        estimates: :class:`Estimate`\\ s, :class:`FisherFlow`\\ s or ``(params, info)``
            pairs over the same layout; ``info`` a FisherMatrix or a tensor.

    Returns:
        The fused :class:`Estimate` (params in the form of the first estimate,
        information in its structure).

    Raises:
        ValueError: On an empty input, mismatched layouts or non-finite values.

    Example:
        >>> one = torch.ones(1, 1, dtype=torch.float64)
        >>> est = fuse([(torch.tensor([0.0], dtype=torch.float64), one),
        ...             (torch.tensor([3.0], dtype=torch.float64), 2 * one)])
        >>> est.params.tolist(), est.information.to_dense().tolist()
        ([2.0], [[3.0]])
    """
    import warnings

    thetas, infos, _, form, _ = parse_estimates(estimates)
    theta, total = fuse_information(thetas, infos)
    if total.rank() < total.size:
        warnings.warn(
            "fused information is singular: unidentified directions are set by the pseudo-inverse",
            RankDeficiencyWarning,
            stacklevel=2,
        )
    return Estimate(form(theta), total)


# ------------------------------------------------------------ robust location
def weiszfeld(
    points: Tensor, metric: Tensor, max_iter: int = 500, tol: float = 1e-10
) -> tuple[Tensor, int]:
    """Geometric median ``argmin_c Σᵢ ‖c - xᵢ‖_M`` by the modified Weiszfeld iteration.

    Points are whitened by the Cholesky factor of ``M`` and the Euclidean median is
    found with the Vardi–Zhang (2000) step, which stays correct when the iterate
    lands on a data point. Breakdown point ``⌊(n-1)/2⌋ / n`` (Lopuhaä & Rousseeuw 1991).

    Args:
        points: ``(n, P)`` points.
        metric: ``(P, P)`` positive-definite metric ``M``.
        max_iter: Iteration limit.
        tol: Stop when the step is below ``tol * (1 + ‖c‖)`` in the whitened space.

    Returns:
        ``(median, iterations)``.

    Example:
        >>> pts = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
        >>> weiszfeld(pts, torch.eye(1, dtype=torch.float64))[0].tolist()
        [1.0]
    """
    chol = torch.linalg.cholesky(metric)
    z = points @ chol  # rows zᵢ = Lᵀ xᵢ, so ‖zᵢ - zⱼ‖ = ‖xᵢ - xⱼ‖_M
    c = z.mean(0)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        diff = z - c
        dist = diff.norm(dim=1)
        at = dist <= 1e-15 * (1 + c.norm())
        w = torch.where(at, torch.zeros_like(dist), 1.0 / torch.where(at, 1.0, dist))
        if float(w.sum()) == 0.0:
            break
        t_tilde = (w[:, None] * z).sum(0) / w.sum()
        if bool(at.any()):  # Vardi & Zhang: move off a data point only if it pays
            r = (w[:, None] * (z - c)).sum(0).norm()
            eta = float(at.sum())
            gamma = min(1.0, eta / float(r)) if float(r) > 0 else 1.0
            new = (1 - gamma) * t_tilde + gamma * c
        else:
            new = t_tilde
        step = float((new - c).norm())
        c = new
        if step <= tol * (1 + float(c.norm())):
            break
    return torch.linalg.solve_triangular(chol.T, c[:, None], upper=True)[:, 0], it


def coordinate_median(points: Tensor) -> Tensor:
    """Coordinate-wise median (the mean of the two middle values for even ``n``).

    Breakdown point ``⌊(n-1)/2⌋ / n``; not affine equivariant.

    Example:
        >>> pts = torch.tensor([[0.0, 5.0], [1.0, 6.0], [9.0, 7.0], [2.0, 0.0]])
        >>> coordinate_median(pts).tolist()
        [1.5, 5.5]
    """
    return torch.from_numpy(np.median(points.numpy(), axis=0)).to(points.dtype)


def trimmed_mean(points: Tensor, trim: float) -> Tensor:
    """Coordinate-wise mean after removing ``⌊trim·n⌋`` values from each end.

    Breakdown point ``⌊trim·n⌋ / n``.

    Example:
        >>> trimmed_mean(torch.tensor([[0.0], [1.0], [2.0], [100.0]]), 0.25).tolist()
        [1.5]
    """
    return torch.from_numpy(np.asarray(sps.trim_mean(points.numpy(), trim, axis=0))).to(
        points.dtype
    )


def _breakdown_median(n: int, trim: float) -> float:
    return (n - 1) // 2 / n


def _breakdown_trim(n: int, trim: float) -> float:
    return int(np.floor(trim * n)) / n


#: Robust locations: ``name -> (location(points, metric, trim), breakdown(n, trim))``.
LOCATIONS: dict[
    str, tuple[Callable[[Tensor, Tensor, float], Tensor], Callable[[int, float], float]]
] = {
    "geometric_median": (lambda x, m, t: weiszfeld(x, m)[0], _breakdown_median),
    "median": (lambda x, m, t: coordinate_median(x), _breakdown_median),
    "trimmed_mean": (lambda x, m, t: trimmed_mean(x, t), _breakdown_trim),
}


@dataclass(frozen=True)
class Downweight:
    """One source that :func:`robust_fuse` down-weighted.

    Attributes:
        index: Position of the source in the input.
        weight: Weight kept on its information (0 = excluded).
        reason: Why, in words, with the numbers.
    """

    index: int
    weight: float
    reason: str


@dataclass
class RobustFusion(Estimate):
    """Result of :func:`robust_fuse`: an :class:`Estimate` plus the report.

    Attributes:
        center: The robust location (before reweighting), same form as ``params``.
        weights: ``(n,)`` weight kept on each source's information.
        downweighted: The sources down-weighted and why.
        breakdown_point: Fraction of arbitrarily corrupted sources tolerated.
        method: The location method used.
    """

    center: Vector | None = None
    weights: Tensor = field(default_factory=lambda: torch.zeros(0))
    downweighted: list[Downweight] = field(default_factory=list)
    breakdown_point: float = 0.0
    method: str = ""


def _median_metric(dense: list[Tensor]) -> Tensor:
    """PSD projection of the entry-wise median information (breakdown ``⌊(n-1)/2⌋/n``)."""
    stack = torch.stack(dense)
    med = torch.from_numpy(np.median(stack.numpy(), axis=0)).to(stack.dtype)
    med = 0.5 * (med + med.T)
    vals, vecs = torch.linalg.eigh(med)
    floor = 1e-10 * float(vals.abs().max().clamp_min(1e-300))
    vals = vals.clamp_min(floor)
    return (vecs * vals) @ vecs.T


def robust_fuse(
    estimates: Iterable[Any],
    method: str = "geometric_median",
    *,
    trim: float = 0.2,
    info_cap: float = 10.0,
    alpha: float = 1e-3,
) -> RobustFusion:
    """Fusion that tolerates a minority of corrupted sources.

    Steps (each source is one vote, whatever information it claims):

    1. **Reference metric** ``M``: the entry-wise median of the sources' information
       matrices, projected to PSD.
    2. **Information cap**: a source claiming more than ``info_cap`` times the median
       information (largest generalised eigenvalue of ``(Iᵢ, M)``) is scaled down to
       ``info_cap`` times.
    3. **Robust center** ``c`` of the ``θᵢ``: the geometric median in the Fisher metric
       ``M`` (Weiszfeld; Vardi & Zhang 2000), the coordinate-wise median, or the
       coordinate-wise trimmed mean.
    4. **Outlier test**: a source whose Fisher distance
       ``dᵢ² = (θᵢ - c)ᵀ Iᵢ (θᵢ - c)`` (capped ``Iᵢ``) exceeds the χ²_P quantile at level
       ``alpha`` is excluded.
    5. **Reweighting**: the result is the plain information-weighted fusion of the
       remaining sources with their capped information (one-step reweighting,
       Rousseeuw & Leroy 1987), so with no corruption it equals :func:`fuse` whenever
       no clean source is flagged (probability about ``1 - n·alpha``).

    **Breakdown point**: ``⌊(n-1)/2⌋/n`` for ``"geometric_median"`` and ``"median"``
    (any ``f < n/2`` corrupted sources, whatever θ and information they claim, move
    the center a bounded amount), ``⌊trim·n⌋/n`` for ``"trimmed_mean"``. Costs
    O(n P² + P³): steps 1-4 compare the sources' dense matrices, whatever their
    structure (for models of up to a few thousand parameters); step 5 fuses in the
    sources' own structure.

    Args:
        estimates: As for :func:`fuse`.
        method: ``"geometric_median"``, ``"median"`` or ``"trimmed_mean"``.
        trim: Fraction cut from each end by ``"trimmed_mean"``, in ``[0, 0.5)``.
        info_cap: Largest allowed information relative to the median source (>= 1).
            Raise it when honest sources differ a lot in size.
        alpha: Per-source false-exclusion rate of the outlier test, in ``(0, 1)``.

    Returns:
        A :class:`RobustFusion` with the fused estimate and the report.

    Raises:
        ValueError: On an unknown method (the message lists the valid ones), bad
            options, mismatched layouts or non-finite input.

    Example:
        >>> one = torch.ones(1, 1, dtype=torch.float64)
        >>> srcs = [(torch.tensor([x], dtype=torch.float64), one) for x in (0.0, 0.2, -0.2)]
        >>> srcs.append((torch.tensor([50.0], dtype=torch.float64), 1e6 * one))  # a liar
        >>> out = robust_fuse(srcs)
        >>> round(out.params.item(), 6), [d.index for d in out.downweighted]
        (0.0, [3])
    """
    if not isinstance(method, str) or method not in LOCATIONS:
        raise ValueError(f"method must be one of {sorted(LOCATIONS)}, got {method!r}")
    trim = check_real(trim, "trim", low=0.0, high=0.5, high_open=True)
    info_cap = check_real(info_cap, "info_cap", low=1.0)
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
    thetas, infos, layout, form, _ = parse_estimates(estimates)
    n, p = len(thetas), layout.size
    dense = [info.to_dense().to(thetas[0].dtype) for info in infos]
    metric = _median_metric(dense)
    m_vals, m_vecs = torch.linalg.eigh(metric)
    m_isqrt = (m_vecs * m_vals.rsqrt()) @ m_vecs.T
    report: dict[int, list[str]] = {}
    scale = torch.ones(n, dtype=thetas[0].dtype)
    for i, mat in enumerate(dense):
        ratio = float(torch.linalg.eigvalsh(m_isqrt @ mat @ m_isqrt).max())
        if ratio > info_cap:
            scale[i] = info_cap / ratio
            report.setdefault(i, []).append(
                f"information claim {ratio:.3g}x the median source, capped at {info_cap:g}x"
            )
    locate, breakdown = LOCATIONS[method]
    points = torch.stack(thetas)
    center = locate(points, metric, trim)
    threshold = float(sps.chi2.isf(alpha, p))
    keep = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        d = thetas[i] - center
        d2 = float(scale[i] * (d @ dense[i] @ d))
        if d2 > threshold:
            keep[i] = False
            report.setdefault(i, []).append(
                f"estimate is {d2**0.5:.3g} Fisher standard deviations from the robust center "
                f"(threshold {threshold**0.5:.3g} at alpha={alpha:g}): excluded"
            )
    weights = torch.where(keep, scale, torch.zeros_like(scale))
    kept = [i for i in range(n) if keep[i]]
    if not kept:  # cannot happen for the center of the points, but never fuse nothing
        kept = list(range(n))
    kept_infos = [infos[i] * float(scale[i]) if float(scale[i]) != 1.0 else infos[i] for i in kept]
    theta, total = fuse_information([thetas[i] for i in kept], kept_infos)
    downweighted = [
        Downweight(i, float(weights[i]), "; ".join(reasons))
        for i, reasons in sorted(report.items())
    ]
    return RobustFusion(
        params=form(theta),
        information=total,
        center=form(center),
        weights=weights,
        downweighted=downweighted,
        breakdown_point=breakdown(n, trim),
        method=method,
    )
