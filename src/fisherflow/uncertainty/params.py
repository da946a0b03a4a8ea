"""Which parameters a Laplace posterior covers: names, a filter, or the last layer.

The last layer is found, not guessed: hooks record the ``nn.Linear`` modules a
forward pass reaches, and the last one called is the output layer. Its parameters are
named as ``model.named_parameters()`` names them, so a weight tied to an input
embedding (GPT-2's ``lm_head``) is called by the embedding's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fisherflow.estimation.data import Forward, default_forward, evaluating

__all__ = ["PARAM_MODES", "last_layer_params", "select_params"]

#: String values of ``params``.
PARAM_MODES = ("last_layer",)

ParamSpec = Iterable[str] | Callable[[str], bool] | str | None


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def last_layer_params(model: nn.Module, inputs: Any, forward: Forward | None = None) -> list[str]:
    """Names of the trainable parameters of the last ``nn.Linear`` a forward reaches.

    Args:
        model: The model.
        inputs: One batch of inputs (the model is called once on them, without grad).
        forward: ``forward(model, inputs)`` (default ``model(inputs)`` /
            ``model(**inputs)``).

    Returns:
        The layer's weight (and bias) names, as ``model.named_parameters()`` names
        them (a tied weight under its first name).

    Raises:
        ValueError: If the forward reaches no ``nn.Linear`` with trainable parameters.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> last_layer_params(model, torch.zeros(1, 3))
        ['2.weight', '2.bias']
    """
    called: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: called.append(mod))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad(), evaluating(model):
            (forward or default_forward)(model, inputs)
    finally:
        for h in handles:
            h.remove()
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    for module in reversed(called):
        found = [names[id(p)] for p in module.parameters(recurse=False) if id(p) in names]
        if found:
            return found
    raise ValueError(
        "params='last_layer' needs a forward that reaches an nn.Linear with trainable "
        f"parameters; {type(model).__name__} reached {len(called)} nn.Linear call(s) and "
        "none had one; pass params as a list of names"
    )


def select_params(
    model: nn.Module, params: ParamSpec, inputs: Any = None, forward: Forward | None = None
) -> list[str] | None:
    """Resolve ``params`` to parameter names, in ``named_parameters()`` order.

    Args:
        model: The model.
        params: ``None`` (every trainable parameter), a list of names, a callable
            ``name -> bool``, or ``"last_layer"``.
        inputs: A batch of inputs, needed for ``"last_layer"`` only.
        forward: ``forward(model, inputs)`` for ``"last_layer"``.

    Returns:
        The names, or ``None`` when ``"last_layer"`` needs inputs not given yet.

    Raises:
        ValueError: If a name is not a trainable parameter, the selection is empty, or
            the string is not one of :data:`PARAM_MODES`.
        TypeError: If ``params`` has another type.
    """
    trainable = _trainable(model)
    if params is None:
        chosen = trainable
    elif isinstance(params, str):
        if params not in PARAM_MODES:
            raise ValueError(
                f"params must be a list of names, a callable or one of {PARAM_MODES}, "
                f"got {params!r}"
            )
        if inputs is None:
            return None
        chosen = last_layer_params(model, inputs, forward)
    elif callable(params):
        chosen = [n for n in trainable if params(n)]
    elif isinstance(params, Iterable):
        wanted = list(params)
        bad = [n for n in wanted if not isinstance(n, str) or n not in trainable]
        if bad:
            raise ValueError(
                f"params must name trainable parameters of the model; unknown: {bad[:5]}"
            )
        keep = set(wanted)
        chosen = [n for n in trainable if n in keep]
    else:
        raise TypeError(
            "params must be None, a list of names, a callable or 'last_layer', "
            f"got {type(params).__name__}"
        )
    if not chosen:
        raise ValueError(f"params selected no trainable parameter of the model (params={params!r})")
    return chosen
