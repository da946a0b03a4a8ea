"""Convolution patches: a convolution's input as the rows of a linear map."""

from __future__ import annotations

import math

import torch.nn.functional as Fn
from torch import Tensor, nn

__all__ = ["patches", "unfold"]


def patches(
    x: Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
    positions_first: bool = False,
) -> Tensor:
    """``(B, C·∏k, L)`` convolution patches of ``(B, C, *spatial)``, as ``F.unfold`` lays them out.

    Built from strided views (``Tensor.unfold`` per spatial dimension) and one copy:
    on CPU ~2x faster than ``F.unfold``'s im2col (128×16×8×8, 3×3: 0.55 ms vs 1.06 ms),
    and it works for any number of spatial dimensions. With ``positions_first`` the
    same values are returned as ``(B, L, C·∏k)``: a view of one ``(C·∏k, B·L)``
    copy (copied as fast as the former), whose rows ``(B·L, C·∏k)`` then need no
    second copy for a Gram matrix (a transposed operand of one matrix product).
    """
    nd = len(kernel)
    if any(padding):
        x = Fn.pad(x, [p for p in reversed(padding) for _ in range(2)])
    v = x
    for i in range(nd):
        v = v.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
        if dilation[i] > 1:
            v = v[..., :: dilation[i]]
    # (B, C, L_1..L_nd, k_1..k_nd) -> (B, C, k_1..k_nd, L_1..L_nd), or with positions
    # first (C, k_1..k_nd, B, L_1..L_nd): the innermost dimensions stay the positions
    spatial, kernels = list(range(2, 2 + nd)), list(range(2 + nd, 2 + 2 * nd))
    positions = math.prod(v.shape[2 : 2 + nd])
    cols = x.shape[1] * math.prod(kernel)
    if positions_first:
        flat = v.permute([1, *kernels, 0, *spatial]).reshape(cols, x.shape[0], positions)
        return flat.permute(1, 2, 0)
    return v.permute([0, 1, *kernels, *spatial]).reshape(x.shape[0], cols, positions)


def unfold(module: nn.Module, x: Tensor) -> Tensor | None:
    """Patches ``(B, L, C_in·k…)`` of a Conv1d/Conv2d input, or ``None`` if unsupported.

    Any padding: numeric zero padding is applied inside :func:`patches`; ``"same"`` and
    the ``reflect``/``replicate``/``circular`` modes pad the input first, exactly as
    the module does (its ``_reversed_padding_repeated_twice``).
    """
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or x.dim() != module.weight.dim():
        return None
    pad = module.padding
    nd = x.dim() - 2
    if module.padding_mode != "zeros" or pad == "same":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = Fn.pad(x, list(module._reversed_padding_repeated_twice), mode=mode)
        pad = (0,) * nd
    elif isinstance(pad, str):
        if pad != "valid":
            return None
        pad = (0,) * nd
    return patches(
        x,
        tuple(module.kernel_size),
        tuple(module.dilation),
        tuple(pad),
        tuple(module.stride),
        positions_first=True,
    )
