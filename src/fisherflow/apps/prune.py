"""``ff.apps.prune``: prune a model's weights by magnitude, Wanda, OBD or OBS on its Fisher.

One call scores every weight (:mod:`fisherflow.apps.scores`), keeps the highest
scores in the requested pattern and scope (:mod:`fisherflow.apps.masks`), sets the
pruned weights to exactly zero and, for OBS, moves the kept weights of each unit to
the minimiser of the Fisher's quadratic model on the kept support
(:mod:`fisherflow.apps.obs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn

from fisherflow.apps.masks import (
    check_nm,
    check_scope,
    from_rows,
    parse_pattern,
    resolve_sparsity,
    select,
    to_rows,
)
from fisherflow.apps.scores import _input_major, _targets, check_method, row_saliency
from fisherflow.matrices import FisherMatrix
from fisherflow.matrices.validate import check_damping

__all__ = ["prune"]

T = TypeVar("T")


def prune(
    model: nn.Module,
    fisher: FisherMatrix | None,
    sparsity: float | None,
    *,
    pattern: str = "unstructured",
    method: str = "obs",
    scope: str = "layer",
    params: Iterable[str] | None = None,
    damping: float = 0.0,
    rel_damping: float = 0.0,
    activations: Mapping[str, Tensor] | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Prune ``model`` in place and return the keep-masks.

    Unstructured pruning removes ``⌊sparsity × size⌋`` weights per scope: per
    parameter tensor (``scope="layer"``), over all pruned tensors together
    (``"global"``) or per output row (``"row"``, the comparison group of Wanda and
    SparseGPT). ``pattern="N:M"`` keeps the N most salient of every M consecutive
    weights along the input dimension of each row (``sparsity`` is then ``1 − N/M``;
    give ``None`` or that value). Rows are the output units: a Linear weight's rows, a
    Conv weight's filters flattened, a Hugging Face ``Conv1D`` weight's columns.

    Methods (see :mod:`fisherflow.apps.scores`): ``"magnitude"`` ``|θ|``; ``"wanda"``
    ``|θ|·‖x‖`` (input norms from ``activations`` or a K-FAC Fisher's input factor);
    ``"obd"`` ``½ F_qq θ²``, weights not moved; ``"obs"`` ``θ² / (2[(F+λI)⁻¹]_qq)`` and
    *joint* compensation: the kept weights of each unit (the whole layout for a dense
    Fisher, a block, a K-FAC output row with its bias, see :mod:`fisherflow.apps.obs`)
    become the exact minimiser of ``½ (θ−θ₀)ᵀ (F+λI) (θ−θ₀)`` with the pruned weights at
    zero — on linear least squares with its exact Fisher, the least-squares refit on
    the kept support. ``"sparsegpt"`` (K-FAC Fisher, ``damping=0``) keeps OBS's saliency
    and mask but compensates column by column with one Cholesky per layer
    (:mod:`fisherflow.apps.sparsegpt`; approximate, far faster at high sparsity).
    Saliencies are compared once (one-shot), before compensation.

    By default only the weights of ``nn.Linear``, ``nn.Conv*d`` and Hugging Face
    ``Conv1D`` modules are pruned; biases, norms and embeddings are not (OBS may still
    move a kept bias or, with a dense Fisher, any parameter the Fisher covers).

    Args:
        model: The model, changed in place.
        fisher: Its Fisher (any structure; layout a subset of the model's parameters
            with their shapes) — needed by ``"obd"`` and ``"obs"``.
        sparsity: Fraction of weights to prune, in ``[0, 1)``; ``None`` with N:M.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        method: ``"magnitude"``, ``"wanda"``, ``"obd"``, ``"obs"`` or ``"sparsegpt"``.
        scope: ``"layer"``, ``"global"`` or ``"row"`` (``"layer"`` with N:M).
        params: Names of the parameters to prune (default: the weight matrices; with a
            Fisher-based method each must be in the Fisher's layout).
        damping: λ >= 0 added to F's diagonal (OBS).
        rel_damping: Further λ as a fraction of the mean diagonal of each OBS unit
            (per K-FAC row ``G_rr · mean(diag A)``; SparseGPT uses 0.01).
        activations: ``{weight name: (n_in,) input norms}`` for ``"wanda"``.
        progress: Show a progress bar over the OBS units.

    Returns:
        ``{name: bool tensor of the parameter's shape}``, ``True`` = kept.

    Raises:
        ValueError: For a sparsity outside ``[0, 1)`` or disagreeing with the pattern,
            an unknown pattern/method/scope, an N:M pattern whose M does not divide a
            row, a Fisher whose layout does not match the model or lacks a pruned
            parameter, NaN weights, negative damping, or a singular OBS block with no
            damping.
        TypeError: If ``model``/``fisher``/``params`` have the wrong type.

    Example:
        >>> model = nn.Linear(4, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -3.0, 0.5, 2.0]]))
        >>> prune(model, None, 0.5, method="magnitude")["weight"].tolist()
        [[False, True, False, True]]
        >>> model.weight.tolist()
        [[0.0, -3.0, 0.0, 2.0]]
    """
    method, fisher = check_method(model, fisher, method)
    nm = parse_pattern(pattern)
    fraction = resolve_sparsity(sparsity, nm)
    check_scope(scope, nm)
    lam, rel = check_damping(damping), check_damping(rel_damping, "rel_damping")
    targets = _targets(model, fisher, params, method)
    named = dict(model.named_parameters())
    majors = _input_major(model)
    if nm is not None:  # before any costly saliency
        for n in targets:
            check_nm(n, to_rows(named[n], majors[n]).shape[1], nm)
    scores, units = row_saliency(model, fisher, method, targets, lam, rel, activations)
    keep = select(scores, fraction, nm, scope)
    masks = {n: from_rows(keep[n], tuple(named[n].shape), majors[n]) for n in targets}
    with torch.no_grad():
        if units:
            for unit in bar(units, progress):
                for name, value in unit.compensate(keep).items():
                    named[name].copy_(value.reshape(named[name].shape))
        for name, mask in masks.items():
            named[name].masked_fill_(~mask.to(named[name].device), 0.0)
    return {n: m.detach().cpu() for n, m in masks.items()}


def bar(items: list[T], progress: bool, desc: str = "OBS", unit: str = "unit") -> Iterable[T]:
    """``items``, behind a progress bar when ``progress`` (OBS units, pruned blocks)."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)
