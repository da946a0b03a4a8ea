"""Diagonal Fisher merging of one tensor in place, reading one input at a time.

The merge of :func:`fisherflow.apps.merge_block` for a diagonal Fisher is
elementwise (Matena & Raffel, 2022, "Merging models with Fisher-weighted
averaging", NeurIPS):

    θ = θ̄ + (Σᵢ wᵢFᵢ + λ)⁺ Σᵢ wᵢFᵢ (θᵢ − θ̄),      θ̄ = Σᵢ ŵᵢθᵢ,

so it needs no flattened copies, no Fisher objects and no solve: three running
tensors (θ̄, the numerator ``Σ wᵢFᵢ(θᵢ − θ̄)`` and the denominator ``Σ wᵢFᵢ``)
updated in place, each input's parameter and Fisher slice read when it is used
and dropped after. The operations and their order are those of ``merge_block``
(the diagonal ``+``, ``mv`` and ``pinv_solve`` with its cut-off), so the result is
bitwise the same; only the memory differs (about five tensors of the unit's size
instead of about a dozen).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fisherflow.matrices.linalg import default_rcond

__all__ = ["merge_diagonal_inplace"]


def _owned(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` as a flat tensor this function may overwrite.

    Always a new tensor: the inputs are never written to. (A tensor read with
    safetensors' ``safe_open`` may map its file privately; writing to it would copy
    its pages into anonymous memory that lives as long as the file handle.)
    """
    out = t.reshape(-1).to(dtype)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def merge_diagonal_inplace(
    read_theta: Callable[[int], Tensor],
    read_fisher: Callable[[int], Tensor],
    weights: Sequence[float],
    damping: float,
    dtype: torch.dtype,
) -> tuple[Tensor, list[float]]:
    """Merge one tensor of ``n`` models under diagonal Fishers, in place.

    Args:
        read_theta: ``i ↦`` model i's tensor (read when called; called twice per
            model: once for θ̄, once for the numerator). Never modified.
        read_fisher: ``i ↦`` model i's Fisher diagonal over that tensor (flat, same
            number of entries), called once per model. Never modified.
        weights: One weight ``>= 0`` per model with a positive sum.
        damping: λ >= 0.
        dtype: The arithmetic dtype (``merge_block``'s: the widest of the inputs',
            at least float32).

    Returns:
        ``(merged flat tensor in dtype, Fisher mass wᵢ·tr Fᵢ per model)``.

    Example:
        >>> th = [torch.tensor([0.0]), torch.tensor([4.0])]
        >>> fi = [torch.tensor([1.0]), torch.tensor([3.0])]
        >>> merged, mass = merge_diagonal_inplace(th.__getitem__, fi.__getitem__, [1.0, 1.0],
        ...                                       0.0, torch.float32)
        >>> merged.tolist(), mass  # (1·0 + 3·4) / (1 + 3)
        ([3.0], [1.0, 3.0])
    """
    n, total = len(weights), sum(weights)
    normalised = [w / total for w in weights]
    # θ̄ exactly as apps.merging._average: ŵ₀θ₀, then add_ with alpha
    anchor = normalised[0] * read_theta(0).reshape(-1).to(dtype)
    for i in range(1, n):
        anchor.add_(read_theta(i).reshape(-1).to(dtype), alpha=normalised[i])
    num: Tensor | None = None
    den: Tensor | None = None
    masses = []
    for i, w in enumerate(weights):
        f = _owned(read_fisher(i), dtype)
        if f.numel() != anchor.numel():
            raise ValueError(
                f"the Fisher slice of model {i} has {f.numel()} entries, the tensor "
                f"{anchor.numel()}"
            )
        masses.append(w * float(f.sum()))
        diff = _owned(read_theta(i), dtype).sub_(anchor).mul_(f).mul_(w)  # w·(F(θ−θ̄))
        num = diff if num is None else num.add_(diff)
        del diff
        f.mul_(w)  # the scaled Fisher w·F, as Diagonal's scaling
        den = f if den is None else den.add_(f)
        del f
    assert num is not None and den is not None
    # (den + λ)⁺ as matrices.linalg.spectral_pinv, with the default cut-off
    rcond = default_rcond(None, den.numel(), den.dtype)
    shifted = den.clamp_min_(0).add_(damping)
    top = shifted.max() if shifted.numel() else shifted.new_tensor(0.0)
    keep = shifted > rcond * top.clamp_min(torch.finfo(shifted.dtype).tiny)
    inverse = torch.reciprocal(shifted.masked_fill_(~keep, 1.0), out=shifted)
    inverse.masked_fill_(~keep, 0.0)
    num.mul_(inverse)
    del den, shifted, inverse, keep
    return anchor.add_(num), masses
