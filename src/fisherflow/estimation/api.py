"""``fisherflow.estimation.estimate``: the Fisher of a model on data, in one call.

A short loop over :class:`~fisherflow.estimation.FisherEstimator`: every batch is fed
with :meth:`~fisherflow.estimation.FisherEstimator.update`, the sums are all-reduced
across ranks on request, and the data is streamed again while the structure asks for
another pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from torch import nn

from fisherflow.distributed import is_distributed
from fisherflow.estimation.data import Forward, evaluating
from fisherflow.estimation.estimator import FisherEstimator
from fisherflow.estimation.likelihoods import Likelihood
from fisherflow.estimation.prepare import (
    _PREPARED as _PREPARED,  # the per-model cache, named here for its tests
)
from fisherflow.estimation.prepare import CONVENTIONS, STRUCTURES, clear_cache
from fisherflow.matrices import FisherMatrix

__all__ = ["CONVENTIONS", "STRUCTURES", "clear_cache", "estimate"]


def _want_distributed(distributed: bool) -> bool:
    """Whether to all-reduce: requested and a process group is initialised.

    Raises:
        TypeError: If ``distributed`` is not a bool.
    """
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
    return distributed and is_distributed()


def _progress(enabled: bool, data: Any, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = len(data) if hasattr(data, "__len__") else None
    return tqdm(total=total, desc=desc, unit="batch", leave=False)


def estimate(
    model: nn.Module,
    data: Iterable[Any],
    likelihood: str | Likelihood,
    kind: str,
    structure: str = "diagonal",
    *,
    mc_samples: int = 1,
    rank: int = 10,
    params: Iterable[str] | None = None,
    convention: str = "expand",
    forward: Forward | None = None,
    shift_labels: bool | None = None,
    seed: int | None = None,
    distributed: bool = False,
    group: Any = None,
    progress: bool = True,
    **likelihood_options: float,
) -> FisherMatrix:
    """Estimate the Fisher information of ``model`` on ``data``.

    A loop over :class:`~fisherflow.estimation.FisherEstimator`, which optimizers and
    custom training loops use directly to feed batches one at a time.

    The result holds the **sum** over observations (``num_samples`` of them; every
    unmasked token of a sequence is one observation). Per-row gradients are computed
    with hooks on common layers (``nn.Linear``, ``nn.Conv1d/2d``, ``nn.Embedding``,
    ``nn.LayerNorm``, ``nn.RMSNorm``, Hugging Face ``Conv1D``,
    ``nn.MultiheadAttention``); other parameterised modules fall back to ``torch.func``
    per-sample gradients with a one-time :class:`~fisherflow.estimation.FallbackNotice`.
    A first batch checks the hooks against autograd, so a parameter used outside its
    layer (tying through ``F.linear``) falls back instead of being silently missed.
    An embedding looked up without the batch dimension and broadcast over it (a
    position embedding: ``(T,)`` or ``(1, T)`` indices) has its output expanded over
    the batch, which gives its per-row gradients, when that first batch shows the
    model output unchanged by the expansion; otherwise it falls back too.

    Kinds (see :mod:`fisherflow.estimation.scores`): ``"exact"`` (closed-form output
    Fisher, the GGN; costs one backward pass per output column and position),
    ``"mc"`` (``mc_samples`` labels sampled from the model per observation, averaged),
    ``"empirical"`` (observed labels; per-row gradients squared — for a sequence the
    row's gradient sums its tokens before squaring).

    Structures: ``"dense"``, ``"diagonal"``, ``"block"`` (one block per module) are
    exact sums of per-row outer products. ``"kfac"``: ``G ⊗ A`` per Linear/Conv/
    Embedding/Conv1D/attention projection, exact diagonal for the rest; for layers
    shared over positions (sequences, conv patches) or applied several times the
    ``convention`` is ``"expand"`` (every position and use is an input vector:
    ``A`` = their mean ``a aᵀ``, ``G`` = sum of ``δ δᵀ``) or ``"reduce"`` (``a``
    averaged and ``δ`` summed over a row's positions first); a weight tied across
    layers of different kinds keeps an exact diagonal. ``"ekfac"``: a second pass
    computes the eigenvalues in the K-FAC eigenbasis; it replays the first pass's
    layer inputs and output gradients (the same MC labels) when they fit in
    :data:`~fisherflow.estimation.accumulate.REPLAY_BYTES`, and streams over ``data``
    again otherwise (``data`` must be re-iterable). ``"lowrank"``: top-``rank``
    eigenpairs of a streaming sketch.

    The model is switched to ``eval()`` during estimation (and restored), so dropout
    is off. Statistics accumulate in float64 for float64 models, float32 otherwise.

    Args:
        model: A ``torch.nn.Module``.
        data: Iterable of ``(inputs, targets)`` or dicts with ``"labels"`` (streamed
            once; twice for EKFAC).
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"``, ``"poisson"``,
            a registered name or a :class:`Likelihood`.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        structure: ``"dense"``, ``"diagonal"``, ``"block"``, ``"kfac"``, ``"ekfac"`` or
            ``"lowrank"``.
        mc_samples: Sampled labels per observation (``"mc"``).
        rank: Rank of ``"lowrank"``.
        params: Names of the parameters to estimate over (default all trainable).
        convention: ``"expand"`` or ``"reduce"`` (K-FAC on shared layers).
        forward: ``forward(model, inputs) -> output`` for models not called as
            ``model(inputs)`` / ``model(**inputs)``.
        shift_labels: Shift dict labels for causal LMs (``None``: automatic, see
            :func:`fisherflow.estimation.data.split_batch`).
        seed: Seed of the MC label sampler (same seed → same labels as
            :func:`fisherflow.reference_fisher`).
        distributed: If ``True`` and a process group is initialised, each rank
            estimates on its own ``data`` (its shard) and the sums are all-reduced:
            every rank returns the estimate on the union of the shards.
        group: The process group (default the world).
        progress: Show a tqdm progress bar.
        **likelihood_options: Likelihood options (e.g. ``variance=0.5``).

    Returns:
        A :class:`~fisherflow.matrices.FisherMatrix` of the requested structure.

    Raises:
        ValueError: For an unknown kind/structure/likelihood/convention, a bad
            ``mc_samples``/``rank``, empty data, NaN/Inf outputs, or EKFAC on a
            one-shot iterator.
        TypeError: If ``model`` is not a module or a batch has the wrong form.

    Example:
        >>> import torch
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> F = estimate(model, [(x, None)], "gaussian", kind="exact",
        ...              structure="dense", progress=False)
        >>> F.to_dense().tolist()  # x xᵀ / σ²
        [[1.0, 2.0], [2.0, 4.0]]
    """
    estimator = FisherEstimator(
        model,
        likelihood,
        kind,
        structure,
        mc_samples=mc_samples,
        rank=rank,
        params=params,
        convention=convention,
        forward=forward,
        shift_labels=shift_labels,
        seed=seed,
        **likelihood_options,
    )
    estimator._share_cached_capture()
    iterator = iter(data)
    if estimator.passes > 1 and iterator is data:
        raise ValueError(
            f"structure={structure!r} needs re-iterable data (a list or DataLoader), "
            "got a one-shot iterator"
        )
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("data is empty") from None
    use_dist = _want_distributed(distributed)
    bar = _progress(progress, data, f"Fisher ({kind}, {structure})")
    batches: Iterable[Any] = itertools.chain([first], iterator)
    with evaluating(model):
        while True:
            for batch in batches:
                estimator.update(batch)
                if bar is not None:
                    bar.update(1)
            if use_dist:
                estimator.all_reduce(group)
            if not estimator.finish_pass():
                break
            batches = data  # the structure asks for the data again
        result = estimator._final_result()
    if bar is not None:
        bar.close()
    return result
