"""A block-local Fisher for ``ff.apps.prune_sequential`` on a Llama-style model.

``BlockFisher(model, calib)`` is an ``estimate(model, names)`` for the blocks of
``model.model.layers`` taken in order. It keeps the hidden states entering the next
block for the calibration rows — computed by the blocks already pruned, so each
block sees the inputs of the pruned model, as in SparseGPT's and Wanda's reference
code — and estimates the block's K-FAC Fisher with ``ff.estimate`` on the block alone
under a Gaussian likelihood on its output (the layer-wise reconstruction objective
of SparseGPT). Its input factors A are the full model's (inputs of each layer, the
same forward pass); only the output factors G differ, and with per-row scope or N:M
patterns (``scope="row"``, ``pattern="2:4"``) OBS, sparsegpt and Wanda depend on A
alone: a row's H is ``G_rr A + λ_r I`` with ``λ_r = rel · G_rr · mean(diag A)``, so
``G_rr`` scales the row's saliencies and cancels in its compensation. So the masks and
weights are those of a full-model K-FAC Fisher on the partially pruned model, for a
fraction of its cost (one forward and backward of each block instead of the whole
model per block).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

import fisherflow as ff


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def block_inputs(
    model: Any, first: int, rows: Tensor, batch: int
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The positional and keyword arguments entering block ``first`` of a Llama-style
    model, one pair per batch of ``rows`` (the forward stops there)."""
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def grab(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, dict(kwargs)))
        raise _Stop

    handle = model.model.layers[first].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                try:
                    model(input_ids=rows[i : i + batch])
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


class _Block(nn.Module):
    """Block ``index`` of ``layers`` as a model, parameters named as in the full model."""

    def __init__(self, layers: nn.ModuleList, index: int, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = layers  # shared, not copied: pruning acts on the real model
        self.index, self.kwargs = index, kwargs

    def forward(self, hidden: Tensor) -> Tensor:
        out = self.model.layers[self.index](hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


class BlockFisher:
    """``estimate(model, names)`` for the blocks of a Llama-style model, in order."""

    def __init__(self, model: Any, calib: Tensor, batch: int = 8, seed: int = 0) -> None:
        self.model, self.seed, self.next = model, seed, 0
        self.hidden: list[Tensor] = []
        self.kwargs: dict[str, Any] = {}
        for args, kw in block_inputs(model, 0, calib, batch):
            self.hidden.append(args[0] if args else kw.pop("hidden_states"))
            self.kwargs = kw
        self.kwargs = {k: v for k, v in self.kwargs.items() if k != "past_key_values"}
        self.kwargs["use_cache"] = False

    def __call__(self, model: nn.Module, names: list[str]) -> ff.FisherMatrix:
        index = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
        if len(index) != 1 or min(index) < self.next:
            raise ValueError(f"BlockFisher takes one block at a time, in order; got {names}")
        b = index.pop()
        layers = self.model.model.layers
        with torch.no_grad():  # advance through the blocks pruned since the last call
            for k in range(self.next, b):
                self.hidden = [_Block(layers, k, self.kwargs)(h) for h in self.hidden]
        self.next = b
        block = _Block(layers, b, self.kwargs)
        batches = [(h, h) for h in self.hidden]  # targets unused by kind "mc"
        return ff.estimate(
            block, batches, "gaussian", "mc", "kfac", params=names, seed=self.seed, progress=False
        )
