"""Cramér–Rao lower bound and a simulation check of estimator efficiency.

For n iid observations any unbiased estimator T of θ satisfies
Cov(T) ⪰ F(θ)⁻¹ / n (Rao 1945; Cramér 1946, §32.3). The MLE attains it
asymptotically; :func:`estimator_efficiency` measures how closely.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from fisherflow.stats._params import check_int, prepare_family
from fisherflow.stats.information import fisher_information

__all__ = ["EfficiencyResult", "cramer_rao_bound", "estimator_efficiency"]


def cramer_rao_bound(
    dist_cls: type[Distribution],
    n: int,
    wrt: str | Iterable[str] | None = None,
    **params: Any,
) -> Tensor:
    """Cramér–Rao bound F(θ)⁻¹ / n on the covariance of unbiased estimators.

    Args:
        dist_cls: a ``torch.distributions.Distribution`` subclass.
        n: number of iid observations (≥ 1).
        wrt: parameters estimated (order of the matrix); default all given.
        **params: the true parameter values.

    Returns:
        Tensor of shape ``batch + (m, m)``.

    Raises:
        ValueError: ``n`` is not a positive integer, invalid parameters, or a
            singular Fisher matrix (a non-identifiable direction has no finite
            bound; see :func:`fisherflow.stats.null_directions`).

    Example:
        >>> import torch
        >>> cramer_rao_bound(torch.distributions.Bernoulli, 100, probs=0.5)  # p(1-p)/n
        tensor([[0.0025]])
    """
    check_int("n", n, 1)
    f = fisher_information(dist_cls, wrt, **params)
    ev = torch.linalg.eigvalsh(f)
    tol = ev.abs().amax(-1, keepdim=True) * f.shape[-1] * torch.finfo(f.dtype).eps
    if bool(torch.any(ev <= tol)):
        raise ValueError(
            f"the Fisher information of {dist_cls.__name__} at {params} is singular "
            f"(eigenvalues {ev.tolist()}); the Cramér–Rao bound is infinite along its "
            "null directions"
        )
    return torch.linalg.inv(f) / n


@dataclass(frozen=True)
class EfficiencyResult:
    """Simulation summary of an estimator against the Cramér–Rao bound.

    Attributes:
        bound: F⁻¹/n, shape (m, m).
        covariance: empirical covariance of the estimates over trials.
        mean: mean estimate (compare with the truth for bias).
        truth: the true θ in the ``wrt`` layout.
        efficiency: diag(bound) / diag(covariance) per parameter (1 = efficient).
        num_trials: number of simulated data sets.
    """

    bound: Tensor
    covariance: Tensor
    mean: Tensor
    truth: Tensor
    efficiency: Tensor
    num_trials: int


def estimator_efficiency(
    dist_cls: type[Distribution],
    estimator: Callable[[Tensor], Tensor],
    n: int,
    wrt: str | Iterable[str] | None = None,
    *,
    num_trials: int = 2000,
    seed: int = 0,
    **params: Any,
) -> EfficiencyResult:
    """Compare an estimator's variance with the Cramér–Rao bound by simulation.

    Args:
        dist_cls: the family (unbatched parameters).
        estimator: maps samples of shape ``(num_trials, n) + event_shape`` to
            estimates of shape ``(num_trials, m)`` (or ``(num_trials,)`` if m = 1),
            in ``wrt`` order.
        n: observations per simulated data set.
        wrt: estimated parameters; default all given continuous ones.
        num_trials: number of simulated data sets (≥ 2).
        seed: seed of the private RNG stream (global RNG untouched).
        **params: the true parameters.

    Returns:
        An :class:`EfficiencyResult`.

    Raises:
        ValueError: bad ``n``/``num_trials``, batched parameters, or an
            estimator output of the wrong shape.

    Example:
        >>> import torch
        >>> r = estimator_efficiency(torch.distributions.Poisson, lambda x: x.mean(1), 50,
        ...                          rate=torch.tensor(3.0, dtype=torch.float64))
        >>> 0.85 < float(r.efficiency[0]) < 1.15  # the sample mean is efficient
        True
    """
    check_int("n", n, 1)
    check_int("num_trials", num_trials, 2)
    if not callable(estimator):
        raise TypeError(f"estimator must be callable, got {estimator!r}")
    fam = prepare_family(dist_cls, wrt, params)
    if fam.batch_shape != torch.Size([]):
        raise ValueError(
            "estimator_efficiency needs unbatched parameters, got batch shape "
            f"{tuple(fam.batch_shape)}"
        )
    bound = cramer_rao_bound(dist_cls, n, fam.wrt, **params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = fam.dist.sample((num_trials, n))
    est = torch.as_tensor(estimator(x)).to(fam.theta.dtype)
    if est.dim() == 1:
        est = est[:, None]
    if est.shape != (num_trials, fam.dim):
        raise ValueError(
            f"estimator must return shape ({num_trials}, {fam.dim}) for parameters "
            f"{list(fam.wrt)}, got {tuple(est.shape)}"
        )
    cov = torch.cov(est.T).reshape(fam.dim, fam.dim)
    eff = bound.diagonal() / cov.diagonal()
    return EfficiencyResult(bound, cov, est.mean(0), fam.theta, eff, num_trials)
