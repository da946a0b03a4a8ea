"""Kinds of Fisher estimate as output-space cotangents ("score directions").

For a batch with model output ``f`` (rows n, observations t within a row), each kind
is a list of cotangents ``c_k`` shaped like ``f`` such that the Fisher of row ``n`` is
``Σ_k J_nᵀ c_{k,n} c_{k,n}ᵀ J_n`` (``J_n``: Jacobian of row n's output):

* ``"empirical"``: one cotangent, ``∂ NLL(f, y) / ∂ f`` with the observed labels, so the
  per-row score is the gradient of the row's summed loss (squared per row, never the
  square of a batch mean);
* ``"mc"``: ``mc_samples`` cotangents ``∂ NLL(f, ŷ_m) / ∂ f / √M`` with labels sampled
  from the model;
* ``"exact"``: one cotangent per observation position ``t`` within a row and column
  ``j`` of ``R`` (``R Rᵀ = Λ``), holding ``R_{n,t}[:, j]`` at position ``t`` only, so
  that ``Σ_k`` gives ``Σ_t J_tᵀ Λ_t J_t`` exactly (the GGN), with no cross-position
  terms. It costs ``positions × columns`` backward passes; :meth:`Scores.per_class`
  gives the ``columns`` cotangents ``R[:, :, j]`` at every position at once, exact
  for the layers no position-mixing operation follows when each (row, position) is
  its own row (:mod:`~fisherflow.estimation.positions`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from fisherflow.estimation.likelihoods import MASK_OPTIONAL, Likelihood, Prepared
from fisherflow.matrices.validate import all_finite

__all__ = ["KIND_SCORES", "Scores", "make_scores"]


class Scores:
    """The cotangents of one batch and the number of observations they cover.

    Attributes:
        count: Number of (unmasked) observations in the batch.
        size: Number of cotangents.
        layout: ``(rows, positions, outputs)``: the output as observations (exact kind;
            ``None`` otherwise).
    """

    def __init__(
        self,
        count: int,
        size: int,
        make: Callable[[], Iterator[Tensor]],
        layout: tuple[int, int, int] | None = None,
        classes: Callable[[], Scores] | None = None,
    ) -> None:
        self.count = count
        self.size = size
        self.layout = layout
        self._make = make
        self._classes = classes

    def __iter__(self) -> Iterator[Tensor]:
        return self._make()

    def per_class(self) -> Scores:
        """The exact kind's one cotangent per class, filled at every position.

        Raises:
            ValueError: If the scores are not the exact kind's.
        """
        if self._classes is None:
            raise ValueError("per_class() needs the scores of kind='exact'")
        return self._classes()


def _output_grad(lik: Likelihood, prep: Prepared, target: Tensor) -> Tensor:
    optional = prep.everyone and type(lik).nll_grad in MASK_OPTIONAL
    return lik.nll_grad(prep.output, target, None if optional else prep.mask)


def _empirical(
    lik: Likelihood, prep: Prepared, rows: int, mc: int, gen: torch.Generator | None
) -> Scores:
    if prep.target is None:
        raise ValueError('kind="empirical" needs targets, but the batch has none')
    target = prep.target
    lik.check_targets(target, prep.mask)
    grad = _output_grad(lik, prep, target).reshape(prep.shape)
    return Scores(prep.count, 1, lambda: iter([grad]))


def _mc(lik: Likelihood, prep: Prepared, rows: int, mc: int, gen: torch.Generator | None) -> Scores:
    scale = 1.0 / math.sqrt(mc)
    grads = []
    for _ in range(mc):
        sampled = lik.sample(prep.output.detach(), gen).to(prep.output.dtype)
        if prep.target is not None and not prep.target.dtype.is_floating_point:
            sampled = sampled.to(prep.target.dtype)
        grad = _output_grad(lik, prep, sampled).reshape(prep.shape)
        grads.append(grad if mc == 1 else grad * scale)
    return Scores(prep.count, mc, lambda: iter(grads))


def _exact(
    lik: Likelihood, prep: Prepared, rows: int, mc: int, gen: torch.Generator | None
) -> Scores:
    n_obs, n_out = prep.output.shape
    r = lik.fisher_sqrt(prep.output.detach())
    diag = r.dim() == 2
    r = r * prep.mask.reshape(-1, *([1] * (r.dim() - 1)))
    cols = n_out if diag else r.shape[-1]
    if n_obs % max(rows, 1):
        raise ValueError(f"{n_obs} observations cannot be split evenly over {rows} rows")
    per_row = n_obs // max(rows, 1)
    rr = r.reshape(rows, per_row, *r.shape[1:])
    alive = prep.mask.reshape(rows, per_row).any(0)

    def make() -> Iterator[Tensor]:
        for t in range(per_row):
            if not bool(alive[t]):
                continue
            for j in range(cols):
                cot = torch.zeros(rows, per_row, n_out, dtype=r.dtype, device=r.device)
                if diag:
                    cot[:, t, j] = rr[:, t, j]
                else:
                    cot[:, t, :] = rr[:, t, :, j]
                yield cot.reshape(prep.shape)

    def make_classes() -> Iterator[Tensor]:
        for j in range(cols):
            if diag:
                cot = torch.zeros(rows, per_row, n_out, dtype=r.dtype, device=r.device)
                cot[:, :, j] = rr[:, :, j]
            else:
                cot = rr[:, :, :, j]
            yield cot.reshape(prep.shape)

    def classes() -> Scores:
        return Scores(prep.count, cols, make_classes, (rows, per_row, n_out))

    size = int(alive.sum().item()) * cols
    return Scores(prep.count, size, make, (rows, per_row, n_out), classes)


#: Cotangent builders by kind.
KIND_SCORES: dict[
    str, Callable[[Likelihood, Prepared, int, int, torch.Generator | None], Scores]
] = {"exact": _exact, "mc": _mc, "empirical": _empirical}


def make_scores(
    lik: Likelihood,
    output: Tensor,
    targets: Tensor | None,
    kind: str,
    rows: int,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    stat_dtype: torch.dtype = torch.float32,
) -> Scores:
    """Cotangents of a batch for a kind (see the module docstring).

    Args:
        lik: The likelihood.
        output: The model output (any dtype; statistics use ``stat_dtype``).
        targets: Targets or ``None`` (then only ``"exact"`` and ``"mc"`` work).
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        rows: Number of rows (examples) in the batch.
        mc_samples: Labels per observation for ``"mc"``.
        generator: Random generator for ``"mc"``.
        stat_dtype: Floating dtype of the cotangents.

    Raises:
        ValueError: If ``kind`` is unknown (lists the valid kinds) or targets are needed.
    """
    if kind not in KIND_SCORES:
        raise ValueError(f"kind must be one of {sorted(KIND_SCORES)}, got {kind!r}")
    prep = lik.prepare(output.detach().to(stat_dtype), targets)
    # one reduction decides in the common case; the full check only if the sum is not
    # finite (a sum of finite values can overflow)
    if not all_finite(prep.output):
        raise ValueError("the model output contains NaN or Inf")
    return KIND_SCORES[kind](lik, prep, rows, mc_samples, generator)
