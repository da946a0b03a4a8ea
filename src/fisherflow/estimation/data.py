"""Batches and model outputs: what ``estimate`` accepts as data and as a model's answer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Batch",
    "default_forward",
    "evaluating",
    "output_tensor",
    "split_batch",
    "to_device",
]

#: ``forward(model, inputs) -> output``: how a model is called on a batch's inputs.
Forward = Callable[[nn.Module, Any], Any]


class Batch:
    """One batch: model inputs, targets (``None`` when unknown) and the row count.

    Args:
        inputs: A tensor, a dict of tensors (Hugging Face style) or any object the
            forward callable understands.
        targets: Targets aligned with the model output, or ``None``.
    """

    def __init__(self, inputs: Any, targets: Tensor | None) -> None:
        self.inputs = inputs
        self.targets = targets


def split_batch(batch: Any, shift_labels: bool | None = None) -> Batch:
    """Split a data item into inputs and targets.

    Accepts ``(inputs, targets)`` pairs and dicts with a ``"labels"`` key (the other
    keys are the model's keyword inputs). With ``shift_labels`` (``None`` = automatic:
    a dict whose labels equal its ``input_ids`` wherever not ``-100``, i.e. a Hugging
    Face causal LM batch) the labels are shifted left by one position and the last
    position masked, so that the output at ``t`` predicts the token at ``t + 1``.

    Raises:
        TypeError: If the item is neither a pair nor a dict with ``"labels"``.
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(f"a dict batch must have a 'labels' key, got keys {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        if shift_labels is None:
            ids = inputs.get("input_ids")
            shift_labels = (
                isinstance(ids, Tensor)
                and isinstance(labels, Tensor)
                and ids.shape == labels.shape
                and bool(((labels == ids) | (labels == -100)).all())
            )
        if shift_labels:
            labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], -100)], dim=-1)
        return Batch(inputs, labels)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if targets is not None and not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
        return Batch(inputs, targets)
    raise TypeError(
        "each data item must be an (inputs, targets) pair or a dict with 'labels', "
        f"got {type(batch).__name__}"
    )


def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (nested in dicts, lists, tuples) to ``device``; floats to ``dtype``."""
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, dtype) for v in obj)
    return obj


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model(**inputs)`` for a dict, ``model(inputs)`` otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def output_tensor(output: Any) -> Tensor:
    """The prediction tensor of a model output: a tensor, ``.logits`` or a 1-tuple.

    Raises:
        TypeError: If no tensor can be found (pass ``forward=`` to adapt the model).
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        "the model output must be a Tensor or have .logits; pass forward=callable(model, "
        f"inputs) returning a tensor, got {type(output).__name__}"
    )


def batch_rows(inputs: Any) -> int:
    """Number of rows (examples) in a batch's inputs: the first tensor's leading size.

    Raises:
        TypeError: If the inputs hold no tensor.
    """
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            if isinstance(v, Tensor):
                return int(v.shape[0])
    if isinstance(inputs, (list, tuple)):
        for v in inputs:
            if isinstance(v, Tensor):
                return int(v.shape[0])
    raise TypeError(f"cannot find a batch dimension in inputs of type {type(inputs).__name__}")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in ``eval()`` mode (dropout off) inside; each module's own flag after.

    ``model.train()`` would recurse, so a model with parts deliberately kept in eval
    mode gets exactly its flags back.
    """
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True
