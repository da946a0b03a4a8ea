"""Tuning the prior precision of a Laplace posterior: by evidence or on held-out data.

``tune_marglik`` maximises the Laplace evidence at the fixed θ* (see
:mod:`fisherflow.uncertainty.evidence`), scalar or per layer; ``tune_val`` picks the
grid value with the lowest held-out negative log-likelihood of the predictive
(laplace-torch's ``optimize_prior_precision(method="gridsearch")``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fisherflow.uncertainty.evidence import maximise_evidence
from fisherflow.uncertainty.posterior import PosteriorPrecision
from fisherflow.uncertainty.prediction import validation_nll
from fisherflow.uncertainty.validate import check_prior_precision

if TYPE_CHECKING:
    from fisherflow.uncertainty.laplace import Laplace

__all__ = ["tune_marglik", "tune_val"]


def tune_marglik(la: Laplace, prior_structure: str) -> Tensor:
    """The prior precision maximising ``la.log_marginal_likelihood`` (scalar or per layer).

    Raises:
        ValueError: If ``la.fit`` has not recorded the log-likelihood.
    """
    if la.loglik is None:
        raise ValueError("optimize_prior_precision('marglik') needs fit(data) first")
    n = len(la.prior_groups) if prior_structure == "layerwise" else 1
    start = la._prior.reshape(-1)
    start = start.expand(n).clone() if start.numel() != n else start.clone()
    tau = start if n > 1 else start[0]
    precision = PosteriorPrecision(la._fisher(), tau, la.temperature)
    eig = precision.piece_eigvals()
    best = maximise_evidence(
        la.loglik,
        la._theta_sq(precision),
        precision.piece_sizes(),
        eig,
        la.temperature,
        start,
    )
    return best if n > 1 else best[0]


def tune_val(
    la: Laplace,
    prior_structure: str,
    val_data: Iterable[Any] | None,
    grid: Tensor | None,
    predict_method: str | None,
) -> Tensor:
    """The grid value of a scalar prior with the lowest held-out predictive NLL.

    Raises:
        ValueError: Without ``val_data``, or for a per-layer prior.
    """
    if val_data is None:
        raise ValueError("optimize_prior_precision('val') needs val_data")
    if prior_structure != "scalar":
        raise ValueError("optimize_prior_precision('val') tunes a scalar prior only")
    values = torch.logspace(-4, 4, 21, dtype=torch.float64) if grid is None else grid
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    scores = [
        validation_nll(la, val_data, check_prior_precision(t), predict_method) for t in values
    ]
    return values[int(torch.tensor(scores).argmin())].clone()
