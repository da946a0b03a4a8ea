"""Sequential pruning: a model's blocks pruned in order, each on a Fisher of the pruned model.

One-shot pruning (:func:`fisherflow.apps.prune` with one Fisher) scores and compensates
every layer with the statistics of the *dense* model. SparseGPT (Frantar & Alistarh,
2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", §3)
and Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for Large
Language Models") prune a transformer block by block instead, each block on the
inputs that the already-pruned earlier blocks produce, so a block's compensation
also absorbs the error its predecessors left. Here each block's Fisher is
re-estimated with :func:`fisherflow.estimate` on the partially pruned model (or by a
caller's ``estimate`` function, e.g. a cheaper block-local one) and the block is then
pruned by :func:`fisherflow.apps.prune`; the first block's result is one-shot's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from fisherflow.apps.masks import check_scope, parse_pattern, resolve_sparsity
from fisherflow.apps.prune import bar, prune
from fisherflow.apps.scores import METHODS, _targets, check_method
from fisherflow.estimation import estimate as estimate_fisher
from fisherflow.matrices import FisherMatrix

__all__ = ["blocks_of", "prune_sequential"]

#: A block's Fisher on the current (partially pruned) model: ``(model, names) -> F``.
Estimate = Callable[[nn.Module, list[str]], FisherMatrix]

_NUMBERED = re.compile(r"^(.*?\.?\d+)\.")


def blocks_of(model: nn.Module, params: Iterable[str] | None = None) -> list[list[str]]:
    """Group the weights to prune by their first numbered module, in parameter order.

    The block of ``model.layers.3.mlp.up_proj.weight`` is ``model.layers.3`` (an entry
    of an ``nn.ModuleList`` or ``nn.Sequential``); a name with no numbered module is a
    block of its own.

    Args:
        model: The model.
        params: Names to group (default: its Linear/Conv/Conv1D weight matrices).

    Returns:
        The blocks, each a list of parameter names, in the model's parameter order.

    Raises:
        ValueError: If ``params`` names no parameter of the model.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> blocks_of(net)
        [['0.weight'], ['2.weight']]
    """
    names = _targets(model, None, params, "magnitude")
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    blocks: dict[str, list[str]] = {}
    for name in sorted(names, key=order.__getitem__):
        match = _NUMBERED.match(name)
        blocks.setdefault(match.group(1) if match else name, []).append(name)
    return list(blocks.values())


def prune_sequential(
    model: nn.Module,
    data: Iterable[Any] | None,
    sparsity: float | None,
    *,
    likelihood: str = "categorical",
    kind: str = "mc",
    structure: str = "kfac",
    blocks: Sequence[Sequence[str]] | None = None,
    estimate: Estimate | None = None,
    pattern: str = "unstructured",
    method: str = "obs",
    scope: str = "layer",
    damping: float = 0.0,
    rel_damping: float = 0.0,
    seed: int | None = 0,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Prune ``model`` in place block by block, re-estimating each block's Fisher.

    For each block in order: its Fisher is estimated on the model as pruned so far —
    ``ff.estimate(model, data, likelihood, kind, structure, params=...)`` over the
    block's weights and the other parameters of their layers (biases), or
    ``estimate(model, block)`` when given — and the block is pruned by
    :func:`fisherflow.apps.prune` with the other arguments. ``"magnitude"`` needs no
    Fisher and equals one-shot pruning; ``"wanda"`` reads its input norms from a K-FAC
    Fisher, so with it each block sees the inputs of the pruned blocks before it.
    ``scope="global"`` is per block here.

    Args:
        model: The model, changed in place.
        data: Calibration batches for ``ff.estimate``, iterated once per block (a list
            or a ``DataLoader``, not a one-shot iterator); ``None`` with ``estimate``.
        sparsity: Fraction to prune in ``[0, 1)``; ``None`` with an N:M pattern.
        likelihood: Likelihood name for ``ff.estimate``.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        structure: Fisher structure (``"kfac"`` for OBS per row, Wanda, sparsegpt).
        blocks: Lists of parameter names pruned together, in order (default
            :func:`blocks_of`).
        estimate: ``(model, names) -> FisherMatrix`` used instead of ``ff.estimate``.
        pattern: ``"unstructured"`` or ``"N:M"``.
        method: ``"magnitude"``, ``"wanda"``, ``"obd"``, ``"obs"`` or ``"sparsegpt"``.
        scope: ``"layer"``, ``"global"`` (within a block) or ``"row"``.
        damping: λ >= 0 added to F's diagonal (OBS).
        rel_damping: λ relative to each OBS unit's mean diagonal.
        seed: Seed of every block's ``ff.estimate`` (MC labels).
        progress: Show a progress bar over the blocks.

    Returns:
        ``{name: bool keep-mask}`` for every pruned parameter.

    Raises:
        ValueError: For empty or overlapping blocks, names not in the model, a one-shot
            iterator as ``data``, no ``data`` and no ``estimate``, and every error of
            :func:`fisherflow.apps.prune`.
        TypeError: If ``model`` is not a module or ``estimate`` not callable.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, -3.0, 0.5, 2.0]] * 2))
        ...     _ = net[1].weight.copy_(torch.tensor([[4.0, -1.0]]))
        >>> masks = prune_sequential(net, None, 0.5, method="magnitude", progress=False)
        >>> masks["0.weight"][0].tolist(), masks["1.weight"].tolist()
        ([False, True, False, True], [[True, False]])
    """
    check_method(model, None, "magnitude")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    groups = _check_blocks(model, blocks)
    nm = parse_pattern(pattern)  # before any costly estimate
    resolve_sparsity(sparsity, nm)
    check_scope(scope, nm)
    needs_fisher = METHODS[method] or method == "wanda"
    if estimate is not None and not callable(estimate):
        raise TypeError(
            f"estimate must be callable (model, names) -> FisherMatrix, got {estimate!r}"
        )
    if needs_fisher and estimate is None:
        if data is None:
            raise ValueError(f"data: method {method!r} needs calibration data or an estimate")
        if iter(data) is data:
            raise ValueError(
                "data must be re-iterable (a list or DataLoader): it is read once per "
                f"block, got a one-shot {type(data).__name__}"
            )
    masks: dict[str, Tensor] = {}
    for group in bar(groups, progress, "blocks", "block"):
        fisher = None
        if needs_fisher and estimate is not None:
            fisher = estimate(model, group)
        elif needs_fisher:
            assert data is not None  # checked above
            params = _with_modules(model, group)
            fisher = estimate_fisher(
                model, data, likelihood, kind, structure, params=params, seed=seed, progress=False
            )
        masks.update(
            prune(
                model,
                fisher,
                sparsity,
                pattern=pattern,
                method=method,
                scope=scope,
                params=group,
                damping=damping,
                rel_damping=rel_damping,
            )
        )
    return masks


def _check_blocks(model: nn.Module, blocks: Sequence[Sequence[str]] | None) -> list[list[str]]:
    if blocks is None:
        return blocks_of(model)
    if isinstance(blocks, str) or not all(not isinstance(b, str) and len(b) > 0 for b in blocks):
        raise ValueError(f"blocks must be a list of non-empty lists of names, got {blocks!r}")
    groups = [list(b) for b in blocks]
    flat = [n for b in groups for n in b]
    repeated = sorted({n for n in flat if flat.count(n) > 1})
    if not groups or repeated:
        raise ValueError(f"blocks must be non-empty and disjoint; repeated: {repeated}")
    named = dict(model.named_parameters())
    unknown = [n for n in flat if n not in named]
    if unknown:
        raise ValueError(f"blocks must name parameters of the model; unknown: {unknown[:5]}")
    return groups


def _with_modules(model: nn.Module, group: list[str]) -> list[str]:
    """``group`` and the other parameters of its modules (a layer's bias).

    K-FAC then keeps each layer as one Kronecker factor pair, which OBS rows and Wanda
    need.
    """
    modules = {n.rpartition(".")[0] for n in group}
    named = [n for n, _ in model.named_parameters()]
    return [n for n in named if n in group or n.rpartition(".")[0] in modules]
