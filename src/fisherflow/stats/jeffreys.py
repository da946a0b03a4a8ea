"""Jeffreys priors π(θ) ∝ √det F(θ) (Jeffreys 1946, Proc. R. Soc. A 186).

The prior is invariant under reparameterisation but not always proper.
Propriety and the normaliser are decided numerically: the parameter domain
is mapped to ℝᵐ by ``torch.distributions.transform_to`` and √det F · |Jacobian|
is integrated on double-exponential nodes over |y| ≤ Y in each coordinate,
Y = 300 for one parameter and Y = 40 for two (beyond, the trigamma
differences in det F lose all float64 precision).
The prior is declared proper when the mass in the outer shell
Y/2 < |y| ≤ Y is negligible (< 1e-10 of the total) or shrinks from the
shell Y/4 < |y| ≤ Y/2 by more than 10% (tails decaying at least like |y|⁻¹·¹);
otherwise it is improper (constant, logarithmic or growing tails).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, transform_to

from fisherflow.stats._params import prepare_family
from fisherflow.stats.information import fisher_information

__all__ = ["JeffreysPrior", "jeffreys_prior"]

_Y_MAX = {1: 300.0, 2: 40.0}


@dataclass(frozen=True)
class JeffreysPrior:
    """Jeffreys prior of a family over the parameters ``wrt``.

    Attributes:
        dist_cls: the family.
        wrt: the free parameters (scalars), in order.
        fixed: parameters held fixed.
        proper: whether √det F integrates over the parameter domain.
        log_normalizer: log ∫ √det F dθ when proper, else ``None``.
    """

    dist_cls: type[Distribution]
    wrt: tuple[str, ...]
    fixed: dict[str, Any]
    proper: bool
    log_normalizer: float | None

    def log_prob(self, *values: Any, normalized: bool = False) -> Tensor:
        """Log-density ½ log det F(θ) (minus ``log_normalizer`` if ``normalized``).

        Args:
            *values: one value (tensor, broadcastable) per ``wrt`` parameter.
            normalized: subtract the log normaliser (proper priors only).

        Returns:
            Tensor of the broadcast shape of ``values``.

        Raises:
            ValueError: wrong number of values, or ``normalized`` for an improper prior.
        """
        if len(values) != len(self.wrt):
            raise ValueError(
                f"log_prob needs one value per parameter {list(self.wrt)}, got {len(values)}"
            )
        if normalized and self.log_normalizer is None:
            raise ValueError(
                f"the Jeffreys prior of {self.dist_cls.__name__} over {list(self.wrt)} is "
                "improper: it has no normaliser"
            )
        params = dict(self.fixed)
        params.update(dict(zip(self.wrt, values, strict=True)))
        f = fisher_information(self.dist_cls, self.wrt, **params)
        out = 0.5 * torch.linalg.slogdet(f)[1]
        sign = torch.linalg.slogdet(f)[0]
        out = torch.where(sign > 0, out, torch.full_like(out, -math.inf))
        return out - self.log_normalizer if normalized and self.log_normalizer else out


def _nodes(h: float, dtype: torch.dtype, y_max: float) -> tuple[Tensor, Tensor]:
    t_max = math.asinh(math.log(y_max) / (0.5 * math.pi))
    t_min = -math.asinh(math.log(1e30) / (0.5 * math.pi))  # innermost |y| ≈ 1e-30
    t = torch.arange(math.floor(t_min / h), math.ceil(t_max / h) + 1, dtype=dtype) * h
    half = torch.exp(0.5 * math.pi * torch.sinh(t))
    dhalf = 0.5 * math.pi * torch.cosh(t) * half * h
    y = torch.cat([-half, half])
    w = torch.cat([dhalf, dhalf])
    keep = y.abs() <= y_max
    return y[keep], w[keep]


def jeffreys_prior(
    dist_cls: type[Distribution],
    wrt: str | Iterable[str] | None = None,
    *,
    reference: dict[str, Any] | None = None,
    **fixed: Any,
) -> JeffreysPrior:
    """Jeffreys prior π(θ) ∝ √det F(θ) of a family, with a propriety check.

    Args:
        dist_cls: a ``torch.distributions.Distribution`` subclass.
        wrt: the free scalar parameters (1 or 2). Default: the family's
            parameters not in ``fixed`` — required ones, those with defaults,
            and the first of each ``None``-default group (``probs`` before
            ``logits``).
        reference: optional values of the free parameters used only to
            construct the family while validating (default: a point in each
            parameter's domain).
        **fixed: parameters held fixed (e.g. ``total_count``, a known ``scale``).

    Returns:
        A :class:`JeffreysPrior`.

    Raises:
        ValueError: no free or more than two free parameters, a non-scalar
            one, or a name in ``wrt`` or ``fixed`` that is not a parameter of
            the family (the message lists the valid names).

    Example:
        >>> import math, torch
        >>> prior = jeffreys_prior(torch.distributions.Bernoulli)
        >>> prior.proper, round(math.exp(prior.log_normalizer), 6)  # Beta(½,½): B(½,½) = π
        (True, 3.141593)
    """
    from fisherflow.stats._params import check_dist_cls, constructor_names

    cls = check_dist_cls(dist_cls)
    names = constructor_names(cls)
    unknown = sorted(n for n in fixed if n not in names)
    if unknown:
        raise ValueError(
            f"jeffreys_prior: {cls.__name__} has no parameter(s) {unknown} to hold fixed; "
            f"valid names: {sorted(names)}"
        )
    if wrt is None:
        alts = [n for n, d in names.items() if d is None and n not in fixed]
        chosen_alt = alts[:1] if not any(names[n] is None for n in fixed) else []
        wrt_t = tuple(
            n for n, d in names.items() if n not in fixed and (d is not None or n in chosen_alt)
        )
    else:
        wrt_t = (wrt,) if isinstance(wrt, str) else tuple(wrt)
        bad = [n for n in wrt_t if not isinstance(n, str) or n not in names]
        if bad:
            raise ValueError(
                f"jeffreys_prior: wrt names unknown parameter(s) {bad} of {cls.__name__}; "
                f"valid names: {sorted(names)}"
            )
        both = sorted(set(wrt_t) & set(fixed))
        if both:
            raise ValueError(f"jeffreys_prior: {both} cannot be both free (wrt) and fixed")
    if not 1 <= len(wrt_t) <= 2:
        raise ValueError(
            f"jeffreys_prior supports 1 or 2 free parameters, got {list(wrt_t)} "
            "(hold others fixed with keyword arguments)"
        )
    dtype = torch.float64
    ref = dict(reference or {})
    raw_cons = getattr(cls, "arg_constraints", {})
    for n in wrt_t:
        con = raw_cons.get(n) if isinstance(raw_cons, dict) else None
        if con is not None and getattr(con, "event_dim", 0) != 0:
            raise ValueError(
                f"jeffreys_prior supports scalar parameters; {n!r} has event_dim {con.event_dim}"
            )
    point = _point(cls, wrt_t, ref, fixed, dtype)
    cons = cls(**fixed, **point, validate_args=False).arg_constraints
    transforms = []
    for n in wrt_t:
        if n not in cons:
            raise ValueError(f"unknown parameter {n!r} of {cls.__name__}; valid: {sorted(cons)}")
        if getattr(cons[n], "event_dim", 0) != 0:
            raise ValueError(
                f"jeffreys_prior supports scalar parameters; {n!r} has event_dim "
                f"{cons[n].event_dim}"
            )
        transforms.append(transform_to(cons[n]))
    prepare_family(cls, wrt_t, {**fixed, **point})
    y_max = _Y_MAX[len(wrt_t)]
    y1, w1 = _nodes(1.0 / 16, dtype, y_max)
    grids = torch.meshgrid(*([y1] * len(wrt_t)), indexing="ij")
    weights = torch.ones_like(grids[0])
    for k in range(len(wrt_t)):
        weights = weights * w1.reshape([-1 if i == k else 1 for i in range(len(wrt_t))])
    values, log_jac = [], torch.zeros_like(grids[0])
    for tr, g in zip(transforms, grids, strict=True):
        v = tr(g)
        values.append(v)
        log_jac = log_jac + tr.log_abs_det_jacobian(g, v)
    prior = JeffreysPrior(cls, wrt_t, dict(fixed), False, None)
    with torch.no_grad():
        lp = prior.log_prob(*values)
    log_dens = lp + log_jac
    dens = torch.where(torch.isfinite(log_dens), torch.exp(log_dens), torch.zeros_like(log_dens))
    radius = torch.stack([g.abs() for g in grids]).amax(0)
    contrib = dens * weights
    total = float(contrib.sum())
    shell2 = float(contrib[radius > y_max / 2].sum())
    shell1 = float(contrib[(radius > y_max / 4) & (radius <= y_max / 2)].sum())
    finite = math.isfinite(total) and total > 0
    decaying = shell2 < 0.9 * shell1 and shell2 < 1e-3 * total
    proper = finite and (shell2 <= 1e-10 * total or decaying)
    return JeffreysPrior(cls, wrt_t, dict(fixed), proper, math.log(total) if proper else None)


def _point(
    cls: type[Distribution],
    wrt: tuple[str, ...],
    ref: dict[str, Any],
    fixed: dict[str, Any],
    dtype: torch.dtype,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    raw = getattr(cls, "arg_constraints", {})
    cons = raw if isinstance(raw, dict) else {}
    for n in wrt:
        if n in ref:
            out[n] = torch.as_tensor(ref[n], dtype=dtype)
        elif n in cons:
            out[n] = transform_to(cons[n])(torch.zeros((), dtype=dtype))
        else:
            out[n] = torch.ones((), dtype=dtype)
    return out
