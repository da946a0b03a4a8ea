"""Score and information of any differentiable log-likelihood, by autograd.

Built on :mod:`fisherflow.stats.likelihood` (the one implementation of
per-observation scores and observed information); this module maps the flat
parameter vector to the user's form and stores the result as a Fisher matrix.

Three named kinds of information (DESIGN.md: kinds are always named):

* ``"observed"``: ``-∇² Σₙ log p(yₙ | θ)`` (the observed information; Efron & Hinkley
  1978). It is not a Fisher "kind" in :data:`fisherflow.matrices.KINDS` and is
  stored with ``kind=None``; it can be indefinite away from the MLE (negative
  eigenvalues are clamped by the solves).
* ``"empirical"``: ``Σₙ gₙ gₙᵀ`` with per-observation scores ``gₙ`` (``kind="empirical"``).
* ``"expected"``: ``E_y[Σₙ gₙ gₙᵀ]`` by Monte Carlo over observations redrawn from the
  model by a user sampler (``kind="mc"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fisherflow.matrices import Dense, FisherMatrix, ParamLayout
from fisherflow.stats.likelihood import observation_scores, observed_information

__all__ = ["INFORMATION", "check_information_kind", "score_and_information"]

#: Information kinds computed by autograd, and the Fisher ``kind`` each is stored as.
INFORMATION: dict[str, str | None] = {"observed": None, "empirical": "empirical", "expected": "mc"}


def check_information_kind(information: object, sampler: object, mc_samples: object) -> None:
    """Validate the information kind and its options.

    Raises:
        ValueError: If the kind is unknown, ``"expected"`` lacks a sampler, or
            ``mc_samples`` is not a positive integer.
    """
    if not isinstance(information, str) or information not in INFORMATION:
        raise ValueError(f"information must be one of {sorted(INFORMATION)}, got {information!r}")
    if information == "expected" and not callable(sampler):
        raise ValueError("information='expected' needs sampler(theta, data, generator) -> data")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")


def _flat(fn: Callable[..., Tensor], to_form: Callable[[Tensor], Any]) -> Callable[..., Tensor]:
    """``fn`` as a function of the flat parameter vector, returning ``(n,)`` values."""

    def flat_log_likelihood(flat: Tensor, data: Any) -> Tensor:
        out = fn(to_form(flat), data)
        if not isinstance(out, Tensor):
            raise TypeError(f"log_likelihood must return a Tensor, got {type(out).__name__}")
        return out.reshape(-1)

    return flat_log_likelihood


def score_and_information(
    log_likelihood: Callable[..., Tensor],
    theta: Tensor,
    data: Any,
    *,
    layout: ParamLayout,
    to_form: Callable[[Tensor], Any] | None = None,
    information: str = "observed",
    sampler: Callable[..., Any] | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, FisherMatrix]:
    """Score ``Σₙ ∇ log p(yₙ|θ)`` and information of a batch, by autograd.

    Args:
        log_likelihood: ``fn(theta, data) -> (n,)`` per-observation log-likelihoods.
        theta: Flat ``(P,)`` parameters.
        data: The batch, passed through to ``log_likelihood``.
        layout: Parameter layout of ``theta``.
        to_form: Maps the flat vector to the form ``log_likelihood`` expects.
        information: ``"observed"``, ``"empirical"`` or ``"expected"``.
        sampler: ``sampler(theta, data, generator) -> data`` for ``"expected"``.
        mc_samples: Monte Carlo draws for ``"expected"``.
        generator: Random generator passed to ``sampler``.

    Returns:
        ``(score, information)`` with information a :class:`Dense` summed over the
        ``n`` observations (``num_samples = n``).

    Raises:
        ValueError: On an unknown kind or non-finite results.

    Example:
        >>> lay = ParamLayout.from_shapes({"mu": (1,)})
        >>> ll = lambda th, y: -0.5 * (y - th) ** 2  # N(mu, 1): information n
        >>> g, I = score_and_information(ll, torch.zeros(1, dtype=torch.float64),
        ...                              torch.tensor([1.0, 3.0], dtype=torch.float64),
        ...                              layout=lay)
        >>> g.tolist(), I.to_dense().tolist()
        ([4.0], [[2.0]])
    """
    check_information_kind(information, sampler, mc_samples)
    ll = _flat(log_likelihood, to_form if to_form is not None else (lambda t: t))
    theta = theta.detach()
    values, scores = observation_scores(ll, theta, data)
    score = scores.sum(0)
    n = values.shape[0]
    if information == "empirical":
        mat = scores.T @ scores
    elif information == "observed":
        mat = observed_information(ll, theta, data)
    else:
        if sampler is None:  # pragma: no cover - check_information_kind refuses it
            raise ValueError("information='expected' needs a sampler")
        mat = torch.zeros(theta.shape[0], theta.shape[0], dtype=theta.dtype)
        form = to_form if to_form is not None else (lambda t: t)
        for _ in range(mc_samples):
            _, drawn = observation_scores(ll, theta, sampler(form(theta), data, generator))
            mat = mat + drawn.T @ drawn / mc_samples
    mat = 0.5 * (mat + mat.T)
    if not (torch.isfinite(score).all() and torch.isfinite(mat).all()):
        raise ValueError("log_likelihood produced a non-finite score or information")
    kind = INFORMATION[information]
    return score.detach(), Dense(mat.detach(), layout, num_samples=float(n), kind=kind)
