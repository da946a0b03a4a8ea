"""What a Fisher Flow remembers: its information sums after forgetting.

A flow holds additive sums — the information ``I``, optionally the canonical vector
``h = I θ`` (information-weighted fusion solves ``I θ = h``), and user ``totals`` —
and a forgetting policy decides how much of them survives each batch:

* a factor ``γ`` (none, exponential, adaptive): ``I ← γ I + I_B``,
  ``h ← γ I θ + h_B``, ``totals ← γ totals + totals_B``;
* a sliding window of ``k`` batches: the sums are recomputed from a permanent base
  (the initial information and its ``h``) plus the last ``k`` batches' terms.

Both are pure: they return the new sums and window, and the flow commits them only
once the update is known to be finite.

Reference: Ljung & Söderström (1983), *Theory and Practice of Recursive
Identification*, ch. 2 (recursive least squares with a forgetting factor).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from fisherflow.matrices import FisherMatrix

__all__ = ["Batch", "Sums", "check_totals", "forgotten_sums", "windowed_sums"]

#: One batch's terms: ``(I_B, h_B or None, totals_B)``.
Batch = tuple[FisherMatrix, Tensor | None, dict[str, Tensor]]
#: The new sums and window: ``(I, h or None, totals, window of batches)``.
Sums = tuple[FisherMatrix, Tensor | None, dict[str, Tensor], deque[Any]]


def check_totals(
    totals: Mapping[str, Tensor] | None, held: Mapping[str, Tensor], dtype: torch.dtype
) -> dict[str, Tensor]:
    """Read a batch's ``totals`` as finite tensors of the shapes already ``held``.

    Raises:
        ValueError: If a value has NaN/Inf, or a shape other than the held total's.

    Example:
        >>> check_totals({"n": 2}, {}, torch.float64)
        {'n': tensor(2., dtype=torch.float64)}
    """
    out: dict[str, Tensor] = {}
    for k, v in (totals or {}).items():
        t = torch.as_tensor(v, dtype=dtype)
        if not torch.isfinite(t).all():
            raise ValueError(f"totals[{k!r}] contains NaN or Inf")
        if k in held and held[k].shape != t.shape:
            raise ValueError(
                f"totals[{k!r}] must have shape {tuple(held[k].shape)}, got {tuple(t.shape)}"
            )
        out[k] = t
    return out


def windowed_sums(
    base: tuple[FisherMatrix, Tensor], window: deque[Any], length: int, batch: Batch
) -> Sums:
    """The sums over the permanent ``base`` and the last ``length`` batches (pure).

    Args:
        base: ``(I₀, I₀ θ₀)``, kept forever.
        window: The batches held so far (not modified).
        length: The window length ``k``.
        batch: The new batch's terms; ``h`` is tracked iff the batch's is not ``None``.

    Returns:
        ``(I, h, totals, window)`` with ``window`` the last ``k`` batches.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"t": (1,)})
        >>> one = lambda x: Diagonal(torch.tensor([x]), lay)
        >>> base, old = (one(1.0), torch.zeros(1)), deque([(one(5.0), None, {})])
        >>> info, h, _, kept = windowed_sums(base, old, 1, (one(2.0), None, {}))
        >>> info.diagonal().tolist(), h, len(kept)  # the base and the newest batch only
        ([3.0], None, 1)
    """
    hist: deque[Any] = deque(window)
    hist.append(batch)
    while len(hist) > length:
        hist.popleft()
    info = base[0]
    h: Tensor | None = base[1] if batch[1] is not None else None
    totals: dict[str, Tensor] = {}
    for i_b, h_b, t_b in hist:
        info = info + i_b
        if h is not None:
            h = h + h_b
        for k, v in t_b.items():
            totals[k] = totals.get(k, torch.zeros_like(v)) + v
    return info, h, totals, hist


def forgotten_sums(
    factor: float,
    held: tuple[FisherMatrix, Tensor, dict[str, Tensor]],
    window: deque[Any],
    batch: Batch,
) -> Sums:
    """The held sums scaled by ``factor`` plus the new batch's terms (pure).

    Args:
        factor: ``γ`` in ``[0, 1]`` (1: nothing forgotten).
        held: ``(I, θ, totals)`` held so far.
        window: The (empty) window, returned as a copy.
        batch: The new batch's terms; ``h`` is tracked iff the batch's is not ``None``.

    Returns:
        ``(γ I + I_B, γ I θ + h_B, γ totals + totals_B, window)``.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"t": (1,)})
        >>> held = (Diagonal(torch.tensor([4.0]), lay), torch.tensor([1.0]), {})
        >>> batch = (Diagonal(torch.tensor([2.0]), lay), torch.tensor([6.0]), {})
        >>> info, h, _, _ = forgotten_sums(0.5, held, deque(), batch)
        >>> info.diagonal().tolist(), h.tolist()  # 0.5·4 + 2, 0.5·4·1 + 6
        ([4.0], [8.0])
    """
    information, theta, held_totals = held
    info_batch, h_batch, batch_totals = batch
    info = (information * factor if factor != 1.0 else information) + info_batch
    h = None
    if h_batch is not None:
        h = factor * cast(Tensor, information.mv(theta)) + h_batch
    totals = {k: factor * v for k, v in held_totals.items()}
    for k, v in batch_totals.items():
        totals[k] = totals[k] + v if k in totals else v
    return info, h, totals, deque(window)
