"""Predictive distributions of a Laplace posterior, per likelihood and method.

``METHODS`` lists what each likelihood supports; :func:`predict_glm` turns the
linearised output Gaussian into a predictive, :func:`predict_mc` pushes parameter
draws through the network, and :func:`validation_nll` scores a prior precision on
held-out data (for ``optimize_prior_precision("val")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fisherflow.estimation.data import (
    batch_rows,
    evaluating,
    output_tensor,
    select_rows,
    split_batch,
)
from fisherflow.estimation.reference import Wrapped
from fisherflow.uncertainty.kronecker import kronecker_functional_covariance
from fisherflow.uncertainty.predictive import (
    bridge_categorical,
    probit_bernoulli,
    probit_categorical,
    sample_outputs,
)

if TYPE_CHECKING:
    from fisherflow.uncertainty.laplace import Laplace

__all__ = [
    "LINKS",
    "METHODS",
    "glm_output",
    "predict_glm",
    "predict_mc",
    "sample_network",
    "validation_nll",
]

#: The predictive methods each likelihood supports (``"mc"`` for any other).
METHODS: dict[str, tuple[str, ...]] = {
    "categorical": ("glm", "probit", "bridge", "mc"),
    "bernoulli": ("glm", "probit", "mc"),
    "gaussian": ("glm", "mc"),
    "poisson": ("glm", "mc"),
}

#: The inverse link of each likelihood: output → predicted mean.
LINKS: dict[str, Callable[[Tensor], Tensor]] = {
    "categorical": lambda f: torch.softmax(f, -1),
    "bernoulli": torch.sigmoid,
    "gaussian": lambda f: f,
    "poisson": torch.exp,
}


def predict_glm(
    name: str,
    method: str,
    mean: Tensor,
    cov: Tensor,
    shape: tuple[int, ...],
    n_samples: int,
    generator: torch.Generator | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The predictive of the linearised model from its output Gaussian.

    Args:
        name: Likelihood name (a key of :data:`METHODS`).
        method: ``"glm"``, ``"probit"`` or ``"bridge"``.
        mean: ``(M, C)`` output means.
        cov: ``(M, C, C)`` output covariances ``J Σ Jᵀ``.
        shape: The model output's shape (results are reshaped to it).
        n_samples: Logit draws for ``"glm"`` with a categorical/bernoulli likelihood.
        generator: Random generator.

    Returns:
        See :meth:`fisherflow.uncertainty.Laplace.predict`.
    """
    var = cov.diagonal(dim1=-2, dim2=-1)
    if name == "gaussian":
        return mean.reshape(shape), var.reshape(shape)
    if name == "poisson":
        return torch.exp(mean + 0.5 * var).reshape(shape)
    if method == "probit":
        probit = probit_categorical if name == "categorical" else probit_bernoulli
        return probit(mean, var).reshape(shape)
    if method == "bridge":
        return bridge_categorical(mean, cov).reshape(shape)
    draws = sample_outputs(mean, cov, n_samples, generator)
    return LINKS[name](draws).mean(0).reshape(shape)


def _output_covariance(la: Laplace, x: Any, jac_rows: int) -> tuple[Tensor, Tensor]:
    """``(J Σ Jᵀ, output)`` of a chunk: ``(rows, K, K)`` and ``(rows, ...)``."""
    if la._fisher().structure in ("kfac", "ekfac"):
        fast = kronecker_functional_covariance(la, x, la._kron_capture(), jac_rows)
        if fast is not None:
            return fast
    rows = batch_rows(x)
    covs, outs = [], []
    for start in range(0, rows, jac_rows):
        J, out = la.jacobians(select_rows(x, start, min(rows, start + jac_rows), rows))
        covs.append(la.functional_variance(J))
        outs.append(out)
    return torch.cat(covs), torch.cat(outs)


def glm_output(
    la: Laplace, x: Any, step: int, jac_rows: int, progress: bool
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """:meth:`Laplace.glm_predictive` over chunks of ``step`` rows (Jacobians: ``jac_rows``).

    Returns the output means ``(M, C)``, their covariances ``(M, C, C)`` (the block
    diagonal of ``J Σ Jᵀ`` over the ``M`` observations of ``C`` outputs) and the
    output's shape.
    """
    rows = batch_rows(x)
    means, covs, outs = [], [], []
    starts: Iterable[int] = range(0, rows, step)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="GLM predictive", unit="batch", leave=False)
    for start in starts:
        cov, out = _output_covariance(
            la, select_rows(x, start, min(rows, start + step), rows), jac_rows
        )
        c = out.shape[-1] if out.dim() >= 2 else 1
        n, k = cov.shape[:2]
        m = k // c
        cov = cov.reshape(n, m, c, m, c).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        means.append(out.reshape(-1, c).to(cov.dtype))
        covs.append(cov.reshape(-1, c, c))
        outs.append(out)
    return torch.cat(means), torch.cat(covs), (rows, *outs[0].shape[1:])


def sample_network(la: Laplace, x: Any, n_samples: int, gen: torch.Generator | None) -> Tensor:
    """``(n, *output)``: the inverse link of the network at ``n`` draws ``θ ~ N(θ*, Σ)``."""
    thetas = la.sample(n_samples, gen)
    wrapped = Wrapped(la.model, la.forward)
    link = LINKS.get(la.likelihood.name, lambda f: f)
    dtype = next(la.model.parameters()).dtype
    outs = []
    with torch.no_grad(), evaluating(la.model):
        for theta in thetas:
            params = {k: v.to(dtype) for k, v in la.layout.unflatten(theta).items()}
            outs.append(link(output_tensor(wrapped.call(params, x)).double()))
    return torch.stack(outs)


def predict_mc(
    la: Laplace, x: Any, n_samples: int, generator: torch.Generator | None
) -> Tensor | tuple[Tensor, Tensor]:
    """``n_samples`` parameter draws ``θ ~ N(θ*, Σ)`` pushed through the network.

    Returns the mean of the inverse link over draws; for a Gaussian likelihood the
    ``(mean, variance)`` of the outputs over draws.
    """
    draws = sample_network(la, x, n_samples, generator)
    mean = draws.mean(0)
    if la.likelihood.name == "gaussian":
        return mean, draws.var(0, correction=0)
    return mean


def _nll(name: str, pred: Tensor | tuple[Tensor, Tensor], target: Tensor, noise: float) -> float:
    """Negative log predictive density of the targets, summed."""
    if isinstance(pred, tuple):
        mean, var = pred
        total = var + noise
        t = target.reshape(mean.shape).to(mean.dtype)
        return float((0.5 * ((t - mean) ** 2 / total + torch.log(2 * math.pi * total))).sum())
    eps = torch.finfo(pred.dtype).tiny
    if name == "categorical":
        p = pred.reshape(-1, pred.shape[-1])
        t = target.reshape(-1).long()
        keep = t != -100
        return float(-(p[keep].gather(1, t[keep, None]).clamp_min(eps).log()).sum())
    t = target.reshape(pred.shape).to(pred.dtype)
    if name == "bernoulli":
        ll = t * pred.clamp_min(eps).log() + (1 - t) * (1 - pred).clamp_min(eps).log()
        return float(-ll.sum())
    # poisson with the predictive mean rate
    return float((pred - t * pred.clamp_min(eps).log() + torch.lgamma(t + 1)).sum())


def validation_nll(
    la: Laplace, val_data: Iterable[Any], tau: Tensor, predict_method: str | None
) -> float:
    """The predictive's negative log-likelihood on ``val_data`` with prior precision ``tau``.

    ``predict_method`` defaults to ``"probit"`` for categorical/bernoulli and ``"glm"``
    otherwise. The posterior's own prior precision is restored afterwards.
    """
    name = la.likelihood.name
    method = predict_method or ("probit" if name in ("categorical", "bernoulli") else "glm")
    noise = la.sigma_noise**2
    saved = la.prior_precision
    total = 0.0
    try:
        la.prior_precision = tau
        for item in val_data:
            batch = split_batch(item)
            if batch.targets is None:
                raise ValueError("val_data needs targets")
            pred = la.predict(
                batch.inputs, method=method, generator=torch.Generator().manual_seed(0)
            )
            total += _nll(name, pred, batch.targets, noise)
    finally:
        la.prior_precision = saved
    return total
