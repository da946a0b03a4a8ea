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
    q = 0.0
    for group in groups:
        for p in group["params"]:
            n = names[id(p)]
            if n in grads:
                q += group["lr"] ** 2 * float((delta[n] * grads[n].to(delta[n].dtype)).sum())
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

    Parameters without a gradient are left alone; ``b = ν Δ`` at first.
    """
    for group in groups:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            n = names[id(p)]
            if n not in grads:
                continue
            d = delta[n].to(dtype=p.dtype, device=p.device)
            if scale != 1.0:
                d = d * scale
            if mu != 0:
                buf = state[p].get("momentum_buffer")
                if buf is None:
                    buf = state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(mu).add_(d)
                d = buf
            if wd != 0:
                p.mul_(1.0 - lr * wd)
            p.add_(d, alpha=-lr)
