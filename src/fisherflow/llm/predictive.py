"""The next-token posterior predictive of a language model, and choosing its temperature.

A Laplace posterior over a language model is only as good as its spread, and with a
last layer of 49k × 576 weights fitted on a few thousand tokens the spread is mostly
the prior's. :func:`optimize_temperature` chooses the temperature ``T`` (and the prior
precision τ) by the held-out negative log-likelihood of the next-token predictive, the
language-model counterpart of :meth:`fisherflow.uncertainty.Laplace.optimize_temperature`
(and of ``optimize_prior_precision("val")``); :func:`next_token_nll` is that score and
:func:`interval_reliability` a binned check of :func:`~fisherflow.llm.token_intervals`
against the tokens that follow.

The predictive is MacKay's probit approximation of the linearised logits,
``softmax(z / √(1 + π σ² / 8))`` with ``σ²`` each logit's variance (MacKay (1992),
"The evidence framework applied to classification networks"; Daxberger et al.
(2021), "Laplace Redux"), taken after projecting the logits to zero sum
(:func:`zero_sum_probit`). It needs the diagonal of the logit covariance and its row
sums: for a last-layer posterior these are read off :mod:`fisherflow.llm.last_layer`
in ``O(V · d)`` per position, never a ``(V, V)`` matrix. Other posteriors go through
:meth:`~fisherflow.uncertainty.Laplace.predict` (small models).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fisherflow.llm.intervals import TokenIntervals
from fisherflow.llm.last_layer import LastLayer, last_layer_view, logit_variances, refreshed
from fisherflow.uncertainty import Laplace
from fisherflow.uncertainty.tuning import TemperatureSearch, tune_temperature

__all__ = [
    "NLL_METHODS",
    "interval_reliability",
    "next_token_nll",
    "optimize_temperature",
    "zero_sum_probit",
]


def zero_sum_probit(mean: Tensor, diag: Tensor, row_sum: Tensor) -> Tensor:
    """Log of the probit predictive of logits ``N(μ, Σ)`` projected to zero sum.

    ``softmax(z) = softmax(Pz)`` with ``P = I − 11ᵀ/V`` (a constant shift of the logits
    changes nothing), so the predictive of ``N(μ, Σ)`` is that of ``N(Pμ, PΣPᵀ)``; the
    probit approximation is applied to the latter, as the Laplace bridge does (Hobbhahn
    et al., 2022), which keeps a direction the likelihood cannot see (a softmax's
    ``1``) from flattening the predictive: ``log softmax(Pμ / √(1 + π v / 8))`` with
    ``v = diag(PΣP) = diag Σ − 2 Σ1 / V + 1ᵀΣ1 / V²``.

    Args:
        mean: ``(N, V)`` logit means ``μ``.
        diag: ``(N, V)`` the diagonal of ``Σ``.
        row_sum: ``(N, V)`` ``Σ1``.

    Returns:
        ``(N, V)`` log-probabilities.

    Example:
        A logit covariance ``c² 11ᵀ`` is a pure shift: the predictive is the mode's.

        >>> mean = torch.tensor([[0.0, 2.0]])
        >>> out = zero_sum_probit(mean, torch.full((1, 2), 9.0), torch.full((1, 2), 18.0))
        >>> torch.allclose(out, torch.log_softmax(mean, -1))
        True
    """
    v = mean.shape[-1]
    total = row_sum.sum(-1, keepdim=True)
    var = (diag - 2 * row_sum / v + total / v**2).clamp_min(0)
    centred = mean - mean.mean(-1, keepdim=True)
    return torch.log_softmax(centred / torch.sqrt(1 + math.pi / 8 * var), -1)


def _probit(la: Laplace, input_ids: Any) -> Tensor:
    logits, view = last_layer_view(la, input_ids)
    if view is None:
        mean, cov, _ = la.glm_predictive(input_ids)
        return zero_sum_probit(mean, cov.diagonal(dim1=-2, dim2=-1), cov.sum(-1))
    return _probit_fast(logits, view)


def _probit_fast(logits: Tensor, view: LastLayer) -> Tensor:
    m = logit_variances(view)  # (N, V) in the output factor's basis
    if view.QG is None:
        diag, row_sum = m, m
    else:
        diag = m @ (view.QG * view.QG).T
        row_sum = (m * view.QG.sum(0)) @ view.QG.T
    flat = logits.reshape(-1, logits.shape[-1]).to(m.dtype)
    return zero_sum_probit(flat, diag, row_sum)


def _map(la: Laplace, input_ids: Any) -> Tensor:
    logits, _ = last_layer_view(la, input_ids)
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)


#: Next-token predictives by name: ``input_ids -> (N, V)`` log-probabilities.
NLL_METHODS: dict[str, Callable[[Laplace, Any], Tensor]] = {"probit": _probit, "map": _map}


def _next_targets(input_ids: Any, targets: Tensor | None) -> Tensor:
    if targets is not None:
        return torch.as_tensor(targets).long()
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(
            "targets must be given unless input_ids is a (B, T) tensor of token ids, got "
            f"{type(input_ids).__name__}"
        )
    shifted = torch.full_like(input_ids, -100)
    shifted[:, :-1] = input_ids[:, 1:]
    return shifted


def next_token_nll(
    la: Laplace, input_ids: Any, *, targets: Tensor | None = None, method: str = "probit"
) -> Tensor:
    """The negative log predictive probability of each next token.

    Args:
        la: A Laplace posterior with a categorical likelihood over a model returning
            ``(B, T, V)`` logits.
        input_ids: ``(B, T)`` token ids (or the model's dict of inputs, with
            ``targets``).
        targets: ``(B, T)`` the token following each position (``-100``: not
            counted); default ``input_ids`` shifted by one (the last position is not
            counted).
        method: ``"probit"`` (the posterior predictive, :func:`zero_sum_probit`) or
            ``"map"`` (``softmax(z)`` at θ*, for comparison).

    Returns:
        A 1-D float tensor: the NLL of every counted position, in row-major order.

    Raises:
        ValueError: For an unknown ``method``, a likelihood other than categorical,
            missing ``targets`` for dict inputs, or ``targets`` not shaped ``(B, T)``.

    Example:
        A model whose logits are all 0 over ``V = 4`` tokens: every NLL is ``log 4``.

        >>> from torch import nn
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> class Zero(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head = nn.Linear(2, 4, bias=False)
        ...         nn.init.zeros_(self.head.weight)
        ...     def forward(self, ids):
        ...         return self.head(torch.ones(*ids.shape, 2))
        >>> model = Zero()
        >>> F = Diagonal(torch.ones(8), ParamLayout.from_model(model))
        >>> la = Laplace(model, likelihood="categorical", fisher=F)
        >>> nll = next_token_nll(la, torch.tensor([[0, 1, 2]]))  # 2 positions have a next token
        >>> torch.allclose(nll, torch.full((2,), math.log(4)))
        True
    """
    if method not in NLL_METHODS:
        raise ValueError(f"method must be one of {list(NLL_METHODS)}, got {method!r}")
    if la.likelihood.name != "categorical":
        raise ValueError(
            f"next_token_nll needs a categorical likelihood, got {la.likelihood.name!r}"
        )
    target = _next_targets(input_ids, targets)
    la.resolve(input_ids)
    la.posterior_precision  # noqa: B018 -- raises before fit
    logp = NLL_METHODS[method](la, input_ids)
    if target.numel() != logp.shape[0]:
        raise ValueError(
            f"targets must have one entry per position ({logp.shape[0]}), got shape "
            f"{tuple(target.shape)}"
        )
    target = target.reshape(-1).to(logp.device)
    keep = target != -100
    return -logp[keep].gather(1, target[keep, None])[:, 0]


def optimize_temperature(
    la: Laplace,
    input_ids: Tensor,
    *,
    grid: Tensor | None = None,
    prior_precision: str | Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> TemperatureSearch:
    """Choose ``T`` (and τ) by the held-out NLL of the next-token predictive; store them.

    Every grid point scores the mean :func:`next_token_nll` (probit) of the held-out
    ``input_ids`` — tokens the posterior was not fitted on — and the best is set on
    ``la``. A last-layer posterior costs one forward per batch, whose logits are kept
    (``N × V`` floats for ``N`` held-out positions), and one ``O(N · V · d)`` product
    per batch and grid point; other posteriors recompute :func:`next_token_nll`.

    Args:
        la: A fitted Laplace posterior (categorical) over a causal language model.
        input_ids: ``(B, T)`` held-out token ids.
        grid: Temperatures (default ``10⁻⁴ … 10``, 11 values).
        prior_precision: ``None`` (keep τ), ``"marglik"`` (τ maximising the evidence at
            each ``T``; needs ``la.fit``) or a tensor of τ values searched jointly.
        batch_size: Rows of ``input_ids`` per forward.
        progress: Show a progress bar over the grid.

    Returns:
        A :class:`~fisherflow.uncertainty.tuning.TemperatureSearch` whose ``scores`` are
        mean NLLs per token (nats).

    Raises:
        ValueError: If ``input_ids`` is not a 2-D tensor with at least 2 columns, or
            ``batch_size`` is not a positive integer, or as :func:`next_token_nll` and
            :func:`~fisherflow.uncertainty.tune_temperature`.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(
            "input_ids must be a (B, T) tensor of token ids with T >= 2, got "
            f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows = input_ids.split(batch_size)
    count = input_ids.shape[0] * (input_ids.shape[1] - 1)
    # one forward per batch: the logits and layer inputs are kept (N × V floats) and only
    # the output layer's variances change with (T, τ)
    cache: list[tuple[Tensor, LastLayer, Tensor]] | None = []
    for r in rows:
        logits, view = last_layer_view(la, r)
        if view is None or cache is None:
            cache = None
            break
        target = _next_targets(r, None).reshape(-1).to(logits.device)
        cache.append((logits.reshape(-1, logits.shape[-1]), view, target))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        points = 11 if grid is None else torch.as_tensor(grid).numel()
        if prior_precision is not None and not isinstance(prior_precision, str):
            points *= torch.as_tensor(prior_precision).numel()
        bar = tqdm(total=points, desc="temperature", unit="point", leave=False)

    def batch_nll(i: int) -> float:
        fresh = None if cache is None else refreshed(la, cache[i][1])
        if cache is None or fresh is None:
            return float(next_token_nll(la, rows[i]).sum())
        logits, _, target = cache[i]
        keep = target != -100
        logp = _probit_fast(logits, fresh)
        return float(-logp[keep].gather(1, target[keep, None]).sum())

    def score() -> float:
        total = sum(batch_nll(i) for i in range(len(rows)))
        if bar is not None:
            bar.update(1)
        return total / count

    try:
        return tune_temperature(la, score, grid, prior_precision)
    finally:
        if bar is not None:
            bar.close()


def interval_reliability(
    intervals: TokenIntervals, targets: Tensor, n_bins: int = 10
) -> dict[str, Tensor]:
    """A binned check of next-token intervals against the tokens that occurred.

    Every (position, candidate token) pair carries an interval ``[l, u]`` for the
    token's probability and an outcome ``y = 1[the next token is that candidate]``. The
    pairs are split into ``n_bins`` bins of equal count by the posterior mean; in each
    bin the observed frequency ``ȳ`` is set beside the mean lower and upper ends. If each
    interval held its token's true probability, ``E ȳ`` would lie in ``[l̄, ū]`` (up to
    the binomial error ``stderr``). The check cannot see per-token coverage — the true
    probabilities are never observed, only one draw per position — so intervals that are
    too wide pass it; it does catch intervals too narrow to contain the calibration
    error of the mode (and a miscalibrated mean).

    Args:
        intervals: From :func:`~fisherflow.llm.token_intervals`, ``(B, T, k)``.
        targets: ``(B, T)`` the token following each position (``-100``: skipped).
        n_bins: Number of bins (equal count).

    Returns:
        A dict of ``(n_bins,)`` float64 tensors: ``count``, ``mean`` (posterior mean
        probability), ``lower``, ``upper`` (mean ends), ``observed`` (frequency),
        ``stderr`` (``√(ȳ(1 − ȳ)/count)``) and ``inside`` (1.0 where ``l̄ ≤ ȳ ≤ ū``).

    Raises:
        ValueError: If ``targets`` is not shaped ``(B, T)`` like the intervals, or
            ``n_bins`` is not a positive integer.

    Example:
        >>> iv = TokenIntervals(torch.tensor([[[0], [1]]]), torch.tensor([[[0.5], [0.5]]]),
        ...                     torch.tensor([[[0.2], [0.2]]]), torch.tensor([[[0.8], [0.8]]]),
        ...                     0.9, "linearized")
        >>> out = interval_reliability(iv, torch.tensor([[0, 0]]), n_bins=1)
        >>> out["observed"].tolist(), out["inside"].tolist()  # 1 hit in 2 pairs
        ([0.5], [1.0])
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if tuple(targets.shape) != tuple(intervals.token_ids.shape[:-1]):
        raise ValueError(
            f"targets must be shaped {tuple(intervals.token_ids.shape[:-1])} like the "
            f"intervals' positions, got {tuple(targets.shape)}"
        )
    k = intervals.token_ids.shape[-1]
    keep = (targets != -100).reshape(-1)
    hit = (intervals.token_ids == targets[..., None].to(intervals.token_ids.device)).reshape(-1, k)

    def flat(t: Tensor) -> Tensor:
        return t.reshape(-1, k)[keep].reshape(-1).double().cpu()

    mean, lower, upper = flat(intervals.mean), flat(intervals.lower), flat(intervals.upper)
    y = hit[keep.to(hit.device)].reshape(-1).double().cpu()
    order = mean.argsort()
    out: dict[str, list[float]] = {
        key: [] for key in ("count", "mean", "lower", "upper", "observed", "stderr", "inside")
    }
    for idx in order.tensor_split(n_bins):
        obs = float(y[idx].mean()) if idx.numel() else float("nan")
        lo, hi = float(lower[idx].mean()), float(upper[idx].mean())
        out["count"].append(float(idx.numel()))
        out["mean"].append(float(mean[idx].mean()))
        out["lower"].append(lo)
        out["upper"].append(hi)
        out["observed"].append(obs)
        out["stderr"].append(math.sqrt(obs * (1 - obs) / max(idx.numel(), 1)))
        out["inside"].append(float(lo <= obs <= hi))
    return {key: torch.tensor(v, dtype=torch.float64) for key, v in out.items()}
