"""The Fisher a Laplace posterior estimates, with large output layers kept diagonal.

K-FAC's output factor of a layer with ``n_out`` outputs is ``n_out × n_out``: 9.6 GB in
float32 for a 49,152-token vocabulary. Above :data:`LARGE_OUTPUT` outputs, a
``nn.Linear`` among the posterior's parameters is estimated with the exact
**diagonal** structure instead (a second pass of :func:`fisherflow.estimate` over
its parameters only), and the two estimates are joined into one K-FAC (or EKFAC)
whose diagonal "rest" holds that layer — the same matrix the estimator builds for a
parameter outside the Kronecker layers. A :class:`LargeOutputNotice` says so once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation import estimate
from fisherflow.estimation.data import Forward, warn_user
from fisherflow.estimation.likelihoods import Likelihood
from fisherflow.matrices import EKFAC, KFAC, FisherMatrix, ParamLayout

__all__ = ["LARGE_OUTPUT", "LargeOutputNotice", "estimate_fisher", "large_output_layers"]

#: A ``nn.Linear`` with more outputs than this keeps a diagonal Fisher in a K-FAC or
#: EKFAC posterior (its output factor would take ``n_out²`` entries).
LARGE_OUTPUT = 8192


class LargeOutputNotice(UserWarning):
    """Issued when a large output layer's Fisher is kept diagonal in a K-FAC posterior."""


def large_output_layers(model: nn.Module, names: list[str], limit: int) -> list[str]:
    """Names of the chosen parameters that belong to a ``nn.Linear`` with > ``limit`` outputs.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 10))
        >>> large_output_layers(model, ["0.weight", "1.weight", "1.bias"], 5)
        ['1.weight', '1.bias']
    """
    chosen = set(names)
    ids = {id(p): n for n, p in model.named_parameters()}
    out: list[str] = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features > limit:
            for p in module.parameters(recurse=False):
                name = ids.get(id(p))
                if name in chosen and name not in out:
                    out.append(name)
    return [n for n in names if n in out]


def estimate_fisher(
    model: nn.Module,
    data: Iterable[Any],
    likelihood: Likelihood,
    kind: str,
    structure: str,
    names: list[str],
    *,
    forward: Forward,
    progress: bool,
    large_output: int = LARGE_OUTPUT,
    **options: Any,
) -> FisherMatrix:
    """:func:`fisherflow.estimate` over ``names``, large output layers kept diagonal.

    Args:
        model: The model.
        data: Re-iterable batches.
        likelihood: The likelihood.
        kind: The kind of Fisher.
        structure: The structure; only ``"kfac"`` and ``"ekfac"`` keep large layers
            diagonal (the others are estimated as asked).
        names: The posterior's parameters.
        forward: How the model is called.
        progress: Progress bars.
        large_output: The size above which an output layer is kept diagonal.
        **options: More options of :func:`fisherflow.estimate`.

    Returns:
        The Fisher over ``names`` (in the model's parameter order).
    """
    common: dict[str, Any] = {"forward": forward, "progress": progress, **options}
    large = (
        large_output_layers(model, names, large_output) if structure in ("kfac", "ekfac") else []
    )
    if not large:
        return estimate(model, data, likelihood, kind, structure, params=names, **common)
    warn_user(
        f"the output layer(s) {large} have more than {large_output} outputs: their Fisher "
        f"is kept diagonal (exact diagonal, kind {kind!r}) in the {structure!r} posterior "
        "instead of a Kronecker product whose output factor would be n_out × n_out",
        LargeOutputNotice,
    )
    layout = ParamLayout.from_model(model, names)
    diag = estimate(model, data, likelihood, kind, "diagonal", params=large, **common)
    values = diag.layout.unflatten(diag.diagonal())
    others = [n for n in names if n not in large]
    kron: FisherMatrix | None = None
    if others:
        kron = estimate(model, data, likelihood, kind, structure, params=others, **common)
        values.update(kron.layout.unflatten(kron.diagonal()))
    groups = kron.kron_groups if isinstance(kron, (KFAC, EKFAC)) else {}
    grouped = {n for spec in groups.values() for n in spec.names}
    rest: Tensor = torch.cat([values[n].reshape(-1) for n in layout.names if n not in grouped])
    meta = diag.meta
    if isinstance(kron, EKFAC):
        return EKFAC(groups, kron.QA, kron.QG, kron.S, layout, rest, **meta)
    A = kron.A if isinstance(kron, KFAC) else {}
    G = kron.G if isinstance(kron, KFAC) else {}
    return KFAC(groups, A, G, layout, rest, **meta)
