"""``nn.MultiheadAttention`` during estimation: an explicit forward whose projections are seen.

PyTorch's fused attention applies ``in_proj_weight`` and ``out_proj`` inside
``F.multi_head_attention_forward``, where no hook sees them. While a capture is
active the module's ``forward`` is replaced by the equivalent computation below, in
which every projection goes through :meth:`Capture.linear` (recorded as a use of the
packed parameter, with the row slice it covers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fisherflow.estimation.capture import Capture

__all__ = ["make_mha_forward"]


def make_mha_forward(capture: Capture) -> Callable[..., Any]:
    """The replacement ``forward(m, query, key, value, ...)`` of a captured attention module."""

    def forward(
        m: nn.MultiheadAttention,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if capture.paused or query.dim() != 3 or (m.training and m.dropout > 0):
            if not capture.paused:
                capture.fail(m)
            return type(m).forward(
                m,
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        same = query is key and key is value
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        H = m.num_heads
        hd = E // H
        W, b = m.in_proj_weight, m.in_proj_bias
        if same:
            q, k, v = capture.linear(m, query, W, b).chunk(3, dim=-1)
        else:
            parts = []
            for i, t in enumerate((query, key, value)):
                sl = slice(i * E, (i + 1) * E)
                parts.append(capture.linear(m, t, W[sl], None if b is None else b[sl], sl, W, b))
            q, k, v = parts
        S = k.shape[1]
        q = q.reshape(B, L, H, hd).transpose(1, 2)
        k = k.reshape(B, S, H, hd).transpose(1, 2)
        v = v.reshape(B, S, H, hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        for mask, shape in ((attn_mask, None), (key_padding_mask, (B, 1, 1, S))):
            if mask is None:
                continue
            if mask.dim() == 3:
                mask = mask.reshape(B, H, L, S)
            elif shape is not None:
                mask = mask.reshape(shape)
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask, float("-inf"))
            else:
                scores = scores + mask.to(scores.dtype)
        attn = torch.softmax(scores, dim=-1)
        ctx = (attn @ v).transpose(1, 2).reshape(B, L, E)
        out = capture.linear(m.out_proj, ctx, m.out_proj.weight, m.out_proj.bias)
        if not m.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
        return out, weights

    return forward
