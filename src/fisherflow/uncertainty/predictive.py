"""The linearised (GLM) predictive: output Jacobians and link approximations.

Around θ*, the model is replaced by its linearisation
``f(x; θ) ≈ f(x; θ*) + J(x)(θ − θ*)``, so that under ``θ ~ N(θ*, Σ)`` the output is
Gaussian, ``N(f(x; θ*), J Σ Jᵀ)`` (Immer, Korzepa & Bauer (2021), "Improving
predictions of Bayesian neural nets via local linearization", AISTATS). The functions
here turn that Gaussian over the output into a predictive distribution; each is a pure
function of the mean ``(M, C)`` and covariance ``(M, C, C)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fisherflow.estimation.data import batch_rows
from fisherflow.estimation.persample import per_row_grads, per_row_grads_loop
from fisherflow.estimation.reference import Wrapped

__all__ = [
    "bridge_categorical",
    "gaussian_sqrt",
    "output_jacobians",
    "probit_bernoulli",
    "probit_categorical",
    "sample_outputs",
]


def output_jacobians(
    wrapped: Wrapped, names: Sequence[str], params: dict[str, Tensor], inputs: Any
) -> tuple[Tensor, Tensor]:
    """Per-row Jacobians of the output with respect to ``names``, in layout order.

    One cotangent per output entry of a row goes through
    :func:`fisherflow.estimation.persample.per_row_grads` (``torch.func.vmap`` of a
    VJP), or its loop over rows when the model cannot be vectorised.

    Args:
        wrapped: The model as a :class:`~fisherflow.estimation.reference.Wrapped`.
        names: Parameter names (layout order).
        params: Their current values.
        inputs: A batch of inputs.

    Returns:
        ``(J, out)``: ``J`` of shape ``(rows, K, P)`` with ``K`` output entries per row,
        and the output ``(rows, ...)``.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> w = Wrapped(lin, lambda m, x: m(x))
        >>> J, _ = output_jacobians(w, ["weight"], {"weight": lin.weight}, torch.ones(3, 2))
        >>> J.shape, J[0].tolist()  # d(w·x)/dw = x
        (torch.Size([3, 1, 2]), [[1.0, 1.0]])
    """
    with torch.no_grad():
        out = wrapped(inputs)
    rows = batch_rows(inputs)
    if out.shape[0] != rows:
        raise ValueError(
            f"the model output must keep the batch in dimension 0 ({rows} rows), got shape "
            f"{tuple(out.shape)}"
        )
    k = out[0].numel()
    eye = torch.eye(k, dtype=out.dtype, device=out.device).reshape(k, 1, *out.shape[1:])
    cots = eye.expand(k, *out.shape)
    try:
        grads = per_row_grads(wrapped, names, params, inputs, cots, rows)
    except RuntimeError:
        grads = per_row_grads_loop(wrapped, names, params, inputs, cots, rows)
    J = torch.cat([grads[n].reshape(k, rows, -1) for n in names], dim=2).transpose(0, 1)
    return J, out


def gaussian_sqrt(cov: Tensor) -> Tensor:
    """A square root ``B`` with ``B Bᵀ = cov`` for batched PSD ``(..., C, C)`` matrices.

    Symmetric eigendecomposition with negative rounding clamped to zero: works for the
    singular covariances of a softmax's logits (constant shifts carry no information).
    """
    vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    return vecs * vals.clamp_min(0).sqrt()[..., None, :]


def sample_outputs(
    mean: Tensor, cov: Tensor, n: int, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` draws ``(n, M, C)`` from ``N(mean_m, cov_m)`` for every row ``m``."""
    z = torch.randn(n, *mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.einsum("mcd,nmd->nmc", gaussian_sqrt(cov), z)


def probit_categorical(mean: Tensor, var: Tensor) -> Tensor:
    """Softmax of the probit-scaled logits ``μ / √(1 + π σ² / 8)``.

    The multiclass extension of MacKay's probit approximation (MacKay, 1992, "The
    evidence framework applied to classification networks"; as in Daxberger et al.,
    2021). ``var`` is the ``(M, C)`` diagonal of the logit covariance.

    Example:
        >>> probit_categorical(torch.tensor([[0.0, 0.0]]), torch.ones(1, 2)).tolist()
        [[0.5, 0.5]]
    """
    return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)


def probit_bernoulli(mean: Tensor, var: Tensor) -> Tensor:
    """``σ(μ / √(1 + π σ² / 8))`` ≈ ``E[σ(f)]`` for ``f ~ N(μ, σ²)`` (MacKay, 1992).

    Example:
        >>> round(probit_bernoulli(torch.tensor(1.0), torch.tensor(8 / math.pi)).item(), 4)
        0.6698
    """
    return torch.sigmoid(mean / torch.sqrt(1.0 + math.pi / 8.0 * var))


def bridge_categorical(mean: Tensor, cov: Tensor) -> Tensor:
    """The Laplace bridge: the Dirichlet matched to a logit Gaussian, its mean.

    The logits are first projected to zero sum (softmax is invariant to constant
    shifts), then ``α_c = (1 − 2/C + e^{μ_c} Σ_j e^{−μ_j} / C²) / σ²_c`` and the
    predictive is ``α / Σα`` (Hobbhahn, Kristiadi & Hennig (2022), "Fast predictive
    uncertainty for classification with Bayesian deep networks", UAI; the zero-mean
    correction of their eq. 6, as laplace-torch applies it).

    Args:
        mean: ``(M, C)`` logit means.
        cov: ``(M, C, C)`` logit covariances.

    Returns:
        ``(M, C)`` probabilities.
    """
    s = cov.sum(-1)  # (M, C)
    total = s.sum(-1, keepdim=True)  # (M, 1)
    mu = mean - s * mean.sum(-1, keepdim=True) / total
    cov = cov - s[:, :, None] * cov.sum(-2)[:, None, :] / total[:, :, None]
    c = mean.shape[-1]
    var = cov.diagonal(dim1=-2, dim2=-1)
    alpha = (1 - 2 / c + mu.exp() / c**2 * torch.exp(-mu).sum(-1, keepdim=True)) / var
    return torch.nan_to_num(alpha / alpha.sum(-1, keepdim=True), nan=1.0 / c)
