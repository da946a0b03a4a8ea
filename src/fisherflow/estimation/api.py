"""``fisherflow.estimation``: the Fisher information of a model on data, in a structure."""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import nn

from fisherflow.estimation.accumulate import ACCUMULATORS, Accumulator, Plan, Recorder
from fisherflow.estimation.capture import Capture
from fisherflow.estimation.data import Forward, default_forward, evaluating
from fisherflow.estimation.distributed import reduce_accumulators, want_distributed
from fisherflow.estimation.engine import Recheck, build_plan, model_signature, probe, run_pass
from fisherflow.estimation.likelihoods import Likelihood, get_likelihood
from fisherflow.estimation.scores import KIND_SCORES
from fisherflow.matrices import KFAC, FisherMatrix, ParamLayout

__all__ = ["CONVENTIONS", "STRUCTURES", "estimate"]

#: Structures ``estimate`` can build.
STRUCTURES = tuple(ACCUMULATORS)
#: K-FAC conventions for layers shared over positions: ``{name: reduce?}``.
CONVENTIONS = {"expand": False, "reduce": True}


class _Prepared:
    """Per-model, per-``params`` state reused across calls: layout, capture, plans."""

    def __init__(self, layout: ParamLayout, capture: Capture | None) -> None:
        self.layout, self.capture = layout, capture
        self.plans: dict[Hashable, Plan] = {}


#: ``{model: {(model signature, params): _Prepared}}``. Values never reference the
#: model strongly (a :class:`Capture` holds it weakly), so entries die with it.
_PREPARED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, _Prepared]] = (
    weakref.WeakKeyDictionary()
)


def clear_cache() -> None:
    """Forget every cached capture, layout and plan (rebuilt on the next call)."""
    _PREPARED.clear()


def _prepared(model: nn.Module, params: Iterable[str] | None, sig: Hashable) -> _Prepared:
    names = None if params is None else tuple(params)
    key = (sig, names)
    try:
        cache = _PREPARED.setdefault(model, {})
    except TypeError:  # pragma: no cover - model not weak-referenceable
        cache = {}
    hit = cache.get(key)
    if hit is not None:
        return hit
    layout = ParamLayout.from_model(model, names)
    if len(cache) >= 4:
        cache.clear()
    cache[key] = prep = _Prepared(layout, None)
    return prep


def _check(kind: str, structure: str, mc_samples: int, rank: int, convention: str) -> None:
    if kind not in KIND_SCORES:
        raise ValueError(f"kind must be one of {sorted(KIND_SCORES)}, got {kind!r}")
    if structure not in ACCUMULATORS:
        raise ValueError(f"structure must be one of {sorted(ACCUMULATORS)}, got {structure!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")


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
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> F = estimate(model, [(x, None)], "gaussian", kind="exact",
        ...              structure="dense", progress=False)
        >>> F.to_dense().tolist()  # x xᵀ / σ²
        [[1.0, 2.0], [2.0, 4.0]]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check(kind, structure, mc_samples, rank, convention)
    lik = get_likelihood(likelihood, **likelihood_options)
    model_sig = model_signature(model)
    prep = _prepared(model, params, model_sig)
    layout = prep.layout
    if layout.size == 0:
        raise ValueError("params selects no trainable parameters")
    p0 = next(p for n, p in model.named_parameters() if n in layout)
    stat = torch.float64 if p0.dtype == torch.float64 else torch.float32
    device = p0.device
    fwd = forward or default_forward
    iterator = iter(data)
    if structure == "ekfac" and iterator is data:
        raise ValueError(
            "structure='ekfac' needs re-iterable data (a list or DataLoader), "
            "got a one-shot iterator"
        )
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("data is empty") from None
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    use_dist = want_distributed(distributed)
    capture = prep.capture
    stack = contextlib.ExitStack()
    stack.enter_context(evaluating(model))
    try:
        if capture is None:
            capture = prep.capture = Capture(model, layout, stat)
        capture.reset()  # fresh hooked set; the fallback notices fire on every call
        common: dict[str, Any] = dict(
            lik=lik, forward=fwd, shift_labels=shift_labels, device=device, stat=stat
        )
        check = probe(
            model,
            first,
            capture,
            forward=fwd,
            shift_labels=shift_labels,
            device=device,
            model_sig=model_sig,
        )
        bar = _progress(progress, data, f"Fisher ({kind}, {structure})")
        stream = functools.partial(
            run_pass,
            model,
            kind=kind,
            mc_samples=mc_samples,
            generator=gen,
            progress=bar,
            **common,
        )
        recorder: Recorder | None = None
        while True:  # again only if the first batch's hook check demotes parameters
            plan = _plan(prep, capture, layout, stat, device, convention)
            acc = _make(structure, plan, rank, distributed=use_dist)
            recorder = Recorder(plan) if structure == "ekfac" else None
            try:
                accs = [acc] if recorder is None else [acc, recorder]
                count = stream(
                    data=itertools.chain([first], iterator), capture=capture, accs=accs, check=check
                )
            except Recheck:
                assert check is not None
                check.demote(capture)
                continue
            break
        count = reduce_accumulators([acc], count, group) if use_dist else count
        meta = {"num_samples": float(count), "kind": kind, "likelihood": lik.name}
        result = acc.build(**meta)
        if structure == "ekfac":
            assert isinstance(result, KFAC)
            acc2 = ACCUMULATORS["ekfac"](plan, kfac=result, rows=acc)
            if recorder is not None and not recorder.overflow:
                recorder.replay([acc2])  # the first pass's gradients, same MC labels
                recorder = None
            else:
                stream(data=iter(data), capture=capture, accs=[acc2])
            if use_dist:
                reduce_accumulators([acc2], 0, group)
            result = acc2.build(**meta)
        if bar is not None:
            bar.close()
    finally:
        if capture is not None:
            capture.start(0)  # drop the last batch's records (activations, graph)
        stack.close()
    return result


def _plan(
    prep: _Prepared,
    capture: Capture,
    layout: ParamLayout,
    stat: torch.dtype,
    device: torch.device,
    convention: str,
) -> Plan:
    """The (cached) plan for the parameters the capture currently hooks."""
    key = (frozenset(capture.hooked), convention)
    plan = prep.plans.get(key)
    if plan is None:
        plan = prep.plans[key] = build_plan(capture, layout, stat, device, CONVENTIONS[convention])
    return plan


def _make(structure: str, plan: Plan, rank: int, distributed: bool = False) -> Accumulator:
    """The first pass's accumulator.

    EKFAC's is K-FAC's, keeping the rows of small factors for fast eigenbases unless
    the pass is split across processes.
    """
    if structure == "dense":
        return ACCUMULATORS["dense"](plan, dense=True)
    if structure == "lowrank":
        return ACCUMULATORS["lowrank"](plan, rank=rank)
    if structure == "ekfac":
        return ACCUMULATORS["kfac"](plan, keep_rows=not distributed)
    return ACCUMULATORS[structure](plan)
