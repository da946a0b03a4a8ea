"""Fishers for free: the diagonal Fisher an Adam-family optimizer already holds.

Adam keeps ``v``, an exponential moving average of the squared mini-batch gradient.
Near a stationary point that average measures the per-example gradient variance,
i.e. the empirical Fisher diagonal; :func:`fisher_from_optimizer` rescales it.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.matrices import Diagonal, FisherMatrix, ParamLayout
from fisherflow.optim.factored import FactoredOptimizer
from fisherflow.optim.natural import NaturalGradient

__all__ = ["fisher_from_optimizer"]


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    out = float(value)
    if not out > 0 or out == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return out


def _second_moment(opt: torch.optim.Optimizer, p: Tensor, group: dict[str, Any]) -> Tensor:
    """Adam's bias-corrected ``v̂ = v / (1 − β₂^t)`` of one parameter."""
    state = opt.state.get(p, {})
    if "exp_avg_sq" not in state or "betas" not in group:
        raise ValueError(
            "opt: a parameter of shape "
            f"{tuple(p.shape)} has no Adam second moment ('exp_avg_sq'); pass a "
            "torch.optim.Adam/AdamW (or a fisherflow optimizer) that has taken a step"
        )
    step = float(state["step"])
    beta2 = float(group["betas"][1])
    return state["exp_avg_sq"].detach() / (1.0 - beta2**step)


def fisher_from_optimizer(
    opt: torch.optim.Optimizer,
    *,
    batch_size: float,
    num_samples: float,
    model: nn.Module | None = None,
) -> FisherMatrix:
    """The Fisher an optimizer holds: Adam's second moment as an empirical diagonal.

    **Derivation.** Let ``g_i`` be the gradient of example ``i``'s loss and the
    training loss a *mean* over a mini-batch ``B`` of size ``B``, so the optimizer
    sees ``ḡ = (1/B) Σ_{i∈B} g_i``. For a batch drawn uniformly without replacement
    from ``N`` examples, elementwise ``E[ḡ²] = ḡ_N² + (1/B) · (N − B)/(N − 1) · s²``
    with ``ḡ_N`` the full-data mean gradient and ``s² = (1/N) Σ_i (g_i − ḡ_N)²``.
    Near a stationary point ``ḡ_N ≈ 0`` and ``s² ≈ (1/N) Σ_i g_i²`` is the
    per-example empirical Fisher diagonal, so ``B · v̂ ≈ s²`` (up to the
    finite-population factor ``(N − B)/(N − 1)``, ≈ 1 for ``B ≪ N``) and the summed
    empirical information over ``num_samples`` observations is
    ``num_samples · B · v̂``. Adam's ``v̂ = v / (1 − β₂ᵗ)`` is the bias-corrected
    EMA of ``ḡ²`` over roughly the last ``1/(1 − β₂)`` steps.

    **When it fails.** Far from a stationary point (``ḡ_N²`` then inflates ``v̂``);
    when the parameters moved a lot over the EMA's window; with a loss summed over
    the batch without saying so (its ``v̂ ≈ B · s²``: pass ``batch_size=1/B``); with
    Adam's coupled ``weight_decay`` (the
    L2 term enters the gradient, AdamW's decoupled decay does not); with gradient
    clipping, gradient accumulation over a different batch size, or a loss that is
    not the likelihood's negative log. It is a diagonal of the *empirical* Fisher,
    with that kind's biases.

    For a :class:`~fisherflow.optim.NaturalGradient` the running Fisher is returned,
    rescaled to ``num_samples`` observations (``opt.fisher().mean() * num_samples``;
    ``batch_size`` is then unused); for :class:`~fisherflow.optim.Shampoo` and
    :class:`~fisherflow.optim.SOAP` their own ``fisher(batch_size=, num_samples=)``
    (rescaled the same way when it is a sampled K-FAC Fisher).

    Args:
        opt: A ``torch.optim.Adam``/``AdamW`` (any optimizer whose state has Adam's
            ``exp_avg_sq`` and ``step``, and whose groups have ``betas``) or a
            fisherflow natural-gradient optimizer, after at least one step.
        batch_size: The mini-batch size ``B`` of the mean-reduced loss (``1/B`` for
            a loss summed over the batch).
        num_samples: Observations the returned information sums over (e.g. the
            training-set size).
        model: The model, to name the parameters (default: ``"param.0"``, ... in
            the optimizer's order).

    Returns:
        A :class:`~fisherflow.matrices.Diagonal` of kind ``"empirical"`` (the
        optimizer's own structure for a natural-gradient optimizer).

    Raises:
        ValueError: If ``batch_size`` or ``num_samples`` is not positive, a parameter
            has no second moment, or a parameter is not in ``model``.
        TypeError: If ``opt`` is not a ``torch.optim.Optimizer``.
    """
    b = _check_positive(batch_size, "batch_size")
    n = _check_positive(num_samples, "num_samples")
    if isinstance(opt, NaturalGradient):
        return opt.fisher().mean() * n
    if isinstance(opt, FactoredOptimizer):
        fisher = opt.fisher(batch_size=b, num_samples=n)  # type: ignore[attr-defined]
        return fisher if fisher.num_samples == n else fisher.mean() * n
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
    moments: dict[int, Tensor] = {}
    params: list[Tensor] = []
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in moments:
                moments[id(p)] = _second_moment(opt, p, group)
                params.append(p)
    if model is None:
        names = [f"param.{i}" for i in range(len(params))]
        layout = ParamLayout.from_shapes(
            [(k, tuple(p.shape)) for k, p in zip(names, params, strict=True)]
        )
        ordered = [moments[id(p)] for p in params]
    else:
        known = {id(p): k for k, p in model.named_parameters()}
        missing = [tuple(p.shape) for p in params if id(p) not in known]
        if missing:
            raise ValueError(f"model: parameters of shapes {missing} are not in the model")
        layout = ParamLayout.from_model(model, [known[id(p)] for p in params])
        by_name = {known[id(p)]: moments[id(p)] for p in params}
        ordered = [by_name[k] for k in layout.names]
    values = torch.cat([v.reshape(-1) for v in ordered]) * (n * b)
    return Diagonal(values, layout, num_samples=n, kind="empirical")
