"""Tuning the prior precision and temperature of a Laplace posterior.

``tune_marglik`` maximises the Laplace evidence at the fixed θ* (see
:mod:`fisherflow.uncertainty.evidence`), scalar or per layer; ``tune_val`` picks the
grid value with the lowest held-out negative log-likelihood of the predictive
(laplace-torch's ``optimize_prior_precision(method="gridsearch")``);
``tune_temperature`` does the same for the temperature ``T`` (with τ kept, re-tuned by
the evidence at each ``T``, or searched jointly), the held-out selection of a
tempered posterior of Wenzel et al. (2020), "How good is the Bayes posterior in deep
neural networks really?", ICML, and of laplace-torch's ``temperature``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fisherflow.uncertainty.evidence import maximise_evidence
from fisherflow.uncertainty.posterior import PosteriorPrecision
from fisherflow.uncertainty.prediction import validation_nll
from fisherflow.uncertainty.validate import check_prior_precision

if TYPE_CHECKING:
    from fisherflow.uncertainty.laplace import Laplace

__all__ = ["TemperatureSearch", "tune_marglik", "tune_temperature", "tune_val"]

#: The default temperature grid: ``10⁻⁴ … 10`` in half decades.
TEMPERATURES = torch.logspace(-4, 1, 11, dtype=torch.float64)


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


@dataclass
class TemperatureSearch:
    """The result of a held-out search over the temperature (and prior precision).

    Attributes:
        temperature: The selected ``T``.
        prior_precision: The selected τ (0-dim).
        temperatures: The grid of ``T``, ``(n_T,)``.
        prior_precisions: τ at each grid point, ``(n_T, n_τ)`` (``n_τ = 1`` unless a τ
            grid was searched jointly).
        scores: The held-out score (negative log-likelihood) at each grid point,
            ``(n_T, n_τ)``.
    """

    temperature: float
    prior_precision: Tensor
    temperatures: Tensor
    prior_precisions: Tensor
    scores: Tensor


def tune_temperature(
    la: Laplace,
    score: Callable[[], float],
    temperatures: Tensor | None = None,
    prior_precision: str | Tensor | None = None,
) -> TemperatureSearch:
    """The grid point of ``T`` (and τ) with the lowest ``score()``; stores it in ``la``.

    ``score`` evaluates the posterior as it currently is (``la.temperature``,
    ``la.prior_precision``), e.g. a held-out negative log-likelihood. Since
    ``Σ = T (F + TτI)⁻¹``, ``T`` scales the whole posterior covariance and τ sets how far
    the data-poor directions spread; they can be chosen together.

    Args:
        la: The posterior (its ``temperature`` and ``prior_precision`` are set to the
            best grid point; on an error they are restored).
        score: Lower is better.
        temperatures: Grid of ``T > 0`` (default ``10⁻⁴ … 10``, 11 values).
        prior_precision: ``None`` keeps the current τ; ``"marglik"`` sets τ at each
            ``T`` to the evidence maximiser (needs ``la.fit``); a 1-D tensor of τ values
            searches the pairs jointly.

    Returns:
        A :class:`TemperatureSearch`.

    Raises:
        ValueError: For a bad grid (empty, non-finite, or not positive), an unknown
            ``prior_precision`` string, or ``None`` with a per-layer τ (scalar τ only).

    Example:
        A score whose minimum is at ``T = 3``:

        >>> from torch import nn
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> from fisherflow.uncertainty import Laplace
        >>> model = nn.Linear(1, 1, bias=False)
        >>> F = Diagonal(torch.ones(1), ParamLayout.from_model(model))
        >>> la = Laplace(model, likelihood="gaussian", fisher=F)
        >>> found = tune_temperature(la, lambda: (la.temperature - 3.0) ** 2,
        ...                          torch.tensor([1.0, 3.0, 10.0]))
        >>> found.temperature, la.temperature, found.scores[:, 0].tolist()
        (3.0, 3.0, [4.0, 0.0, 49.0])
    """
    grid = TEMPERATURES if temperatures is None else temperatures
    grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()) or bool((grid <= 0).any()):
        raise ValueError(f"temperatures must be finite and > 0, got {grid.tolist()}")
    if isinstance(prior_precision, str) and prior_precision != "marglik":
        raise ValueError(
            f"prior_precision must be None, 'marglik' or a tensor of values, got "
            f"{prior_precision!r}"
        )
    if prior_precision is None and la.prior_precision.numel() != 1:
        raise ValueError(
            "tune_temperature keeps a scalar prior precision only, got one per layer: pass "
            "prior_precision='marglik' or a tensor of scalar values"
        )
    taus = None
    if prior_precision is not None and not isinstance(prior_precision, str):
        taus = [check_prior_precision(t) for t in torch.as_tensor(prior_precision).reshape(-1)]
    saved_t, saved_tau = la.temperature, la.prior_precision
    table, chosen = [], []
    try:
        for t in grid.tolist():
            la.temperature = t
            if prior_precision == "marglik":
                la.prior_precision = tune_marglik(la, "scalar")
            options = [la.prior_precision] if taus is None else taus
            row, row_tau = [], []
            for tau in options:
                la.prior_precision = tau
                row.append(float(score()))
                row_tau.append(float(tau))
            table.append(row)
            chosen.append(row_tau)
    except BaseException:
        la.temperature, la.prior_precision = saved_t, saved_tau
        raise
    scores = torch.tensor(table, dtype=torch.float64)
    tau_grid = torch.tensor(chosen, dtype=torch.float64)
    best = int(torch.nan_to_num(scores, nan=float("inf")).argmin())
    i, j = divmod(best, scores.shape[1])
    la.temperature = float(grid[i])
    la.prior_precision = tau_grid[i, j].clone()
    return TemperatureSearch(float(grid[i]), tau_grid[i, j].clone(), grid, tau_grid, scores)
