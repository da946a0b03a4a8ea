"""The parameter update of a preconditioned direction: trust region, momentum, decay."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["apply_direction", "kl_clip_scale"]


def kl_clip_scale(
    groups: list[dict[str, Any]],
    names: Mapping[int, str],
    delta: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    kl_clip: float | None,
) -> float:
    """ν = min(1, √(2κ / Σ lr² Δᵀg)): the step ``−lr ν Δ`` keeps ½uᵀ(F + λI)u ≤ κ.

    Martens & Grosse (2015), §6.4: with ``Δ = (F + λI)⁻¹ g``, ``Δᵀg = Δᵀ(F + λI)Δ``.
    ``1`` when ``kl_clip`` is ``None`` or the quadratic form is not positive.

    Example:
        >>> p = torch.zeros(1)
        >>> kl_clip_scale([{"params": [p], "lr": 1.0}], {id(p): "w"},
        ...               {"w": torch.tensor([2.0])}, {"w": torch.tensor([2.0])}, 0.5)
        0.5
    """
    if kl_clip is None:
        return 1.0
    terms, weights = [], []
    for group in groups:
        for p in group["params"]:
            n = names[id(p)]
            if n in grads:
                terms.append((delta[n] * grads[n].to(delta[n].dtype)).sum())
                weights.append(group["lr"] ** 2)
    # one synchronisation for all of them, then summed in double precision
    values = torch.stack(terms).tolist() if terms else []
    q = 0.0
    for w, v in zip(weights, values, strict=True):
        q += w * v
    return min(1.0, math.sqrt(2.0 * kl_clip / q)) if q > 0 else 1.0


@torch.no_grad()
def apply_direction(
    groups: list[dict[str, Any]],
    names: Mapping[int, str],
    state: Mapping[Tensor, dict[str, Any]],
    delta: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    scale: float,
) -> None:
    """``b ← μ b + ν Δ``; ``θ ← (1 − lr·wd) θ − lr b`` per group (decoupled weight decay).

    Parameters without a gradient are left alone; ``b = ν Δ`` at first. Each group's
    tensors are updated by ``torch._foreach_*`` calls (the same arithmetic as one
    tensor at a time, without a Python round trip per parameter).
    """
    for group in groups:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        params = [p for p in group["params"] if names[id(p)] in grads]
        if not params:
            continue
        d = [delta[names[id(p)]].to(dtype=p.dtype, device=p.device) for p in params]
        if scale != 1.0:
            d = list(torch._foreach_mul(d, scale))
        if mu != 0:
            fresh = [
                (p, x) for p, x in zip(params, d, strict=True) if "momentum_buffer" not in state[p]
            ]
            kept = [
                (state[p]["momentum_buffer"], x)
                for p, x in zip(params, d, strict=True)
                if "momentum_buffer" in state[p]
            ]
            if kept:
                bufs = [b for b, _ in kept]
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, [x for _, x in kept])
            for p, x in fresh:
                state[p]["momentum_buffer"] = x.clone()
            d = [state[p]["momentum_buffer"] for p in params]
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, d, alpha=-lr)
