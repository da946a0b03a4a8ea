"""Batches and model outputs: what ``estimate`` accepts as data and as a model's answer."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Batch",
    "DataNotice",
    "batch_rows",
    "default_forward",
    "evaluating",
    "is_batched",
    "output_note",
    "output_tensor",
    "select_rows",
    "split_batch",
    "tensor_leaves",
    "to_device",
    "warn_user",
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
        #: a rule applied to this batch that the user may not expect (see
        #: :func:`split_batch`), or ``None``
        self.note: str | None = None


class DataNotice(UserWarning):
    """Issued once per pass when a batch or output is read by a rule that may surprise.

    E.g. a model returning a tuple of several tensors (the first is used), or a pair
    whose targets equal its inputs (not shifted as a causal LM's would be).
    """


#: Frames in these files are fisherflow's own (or the ``with`` machinery around an
#: estimator's context manager); a notice points at the first frame outside them.
_OWN_FILES = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), contextlib.__file__)


def warn_user(message: str, category: type[Warning]) -> None:
    """Issue a warning attributed to the user's code, not to fisherflow's frames.

    Python 3.11's ``warnings.warn`` has no ``skip_file_prefixes`` (3.12+), and a fixed
    ``stacklevel`` points at a different frame from each entry point (``estimate``,
    ``FisherEstimator.update``, ``update_from``), so the level is counted here.

    Args:
        message: The warning text.
        category: The warning class.
    """
    frame = sys._getframe(0)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_OWN_FILES):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _shift(labels: Tensor) -> Tensor:
    """Labels shifted left by one position, the last position masked (``-100``)."""
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], -100)], dim=-1)


def _same_tokens(ids: Any, labels: Any) -> bool:
    """Whether integer ``labels`` equal ``ids`` wherever not ``-100`` (a causal LM batch)."""
    return (
        isinstance(ids, Tensor)
        and isinstance(labels, Tensor)
        and not labels.dtype.is_floating_point
        and ids.shape == labels.shape
        and bool(((labels == ids) | (labels == -100)).all())
    )


def split_batch(batch: Any, shift_labels: bool | None = None) -> Batch:
    """Split a data item into inputs and targets.

    Accepts ``(inputs, targets)`` pairs and dicts with a ``"labels"`` key (the other
    keys are the model's keyword inputs). With ``shift_labels`` the labels are shifted
    left by one position and the last position masked, so that the output at ``t``
    predicts the token at ``t + 1`` (a causal LM). ``None`` = automatic for dicts
    only: a dict whose labels equal its ``input_ids`` wherever not ``-100`` (a Hugging
    Face causal LM batch) is shifted; a pair is never shifted automatically, and one
    whose targets equal its inputs is flagged (``Batch.note``) so that the pass can
    issue a one-time :class:`DataNotice`. ``True`` shifts pairs and dicts alike.

    Raises:
        TypeError: If the item is neither a pair nor a dict with ``"labels"``.
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(f"a dict batch must have a 'labels' key, got keys {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        if shift_labels is None:
            shift_labels = _same_tokens(inputs.get("input_ids"), labels)
        if shift_labels:
            labels = _shift(labels)
        return Batch(inputs, labels)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if targets is not None and not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
        if shift_labels and targets is not None:
            return Batch(inputs, _shift(targets))
        out = Batch(inputs, targets)
        if shift_labels is None and _same_tokens(inputs, targets):
            out.note = (
                "the targets of an (inputs, targets) pair equal its inputs: they are not "
                "shifted (only dict batches are shifted automatically); for a causal "
                "language model pass shift_labels=True"
            )
        return out
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
    """The prediction tensor of a model output: a tensor, ``.logits`` or a tuple's first.

    A tuple or list gives its first element (a tensor); :func:`output_note` says when
    that choice is ambiguous (several tensors).

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


def output_note(output: Any) -> str | None:
    """Why :func:`output_tensor`'s choice may be unintended, or ``None``.

    A plain tuple or list holding several tensors (``(logits, hidden)`` or ``(aux,
    logits)``): the first is used, by rule.
    """
    if isinstance(output, Tensor) or not isinstance(output, (tuple, list)):
        return None
    if isinstance(getattr(output, "logits", None), Tensor):
        return None
    shapes = [tuple(v.shape) for v in output if isinstance(v, Tensor)]
    if len(shapes) < 2:
        return None
    return (
        f"the model returned a {type(output).__name__} of {len(shapes)} tensors (shapes "
        f"{shapes[:4]}); by rule its first element is the prediction; pass "
        "forward=lambda model, inputs: ... returning the logits if it is not"
    )


def tensor_leaves(inputs: Any, path: str = "inputs") -> list[tuple[str, Tensor]]:
    """Every tensor in nested dicts, lists and tuples, with its path (``inputs['ids']``)."""
    if isinstance(inputs, Tensor):
        return [(path, inputs)]
    if isinstance(inputs, Mapping):
        return [lf for k, v in inputs.items() for lf in tensor_leaves(v, f"{path}[{k!r}]")]
    if isinstance(inputs, (list, tuple)):
        return [lf for i, v in enumerate(inputs) for lf in tensor_leaves(v, f"{path}[{i}]")]
    return []


def batch_rows(inputs: Any, targets: Tensor | None = None) -> int:
    """Number of rows (examples) in a batch: the size of dimension 0 they share.

    A tensor input gives its leading size. In a dict (or list, tuple) every tensor is
    looked at: the batch size is the targets' leading size when some input tensor has
    it; otherwise the one leading size other than 1 (a size-1 leading dimension, such
    as ``position_ids`` of shape ``(1, T)``, broadcasts over the batch), or 1 when all
    are 1. Scalars (0-d tensors) carry no batch and are ignored.

    Args:
        inputs: A batch's inputs.
        targets: The batch's targets, or ``None``.

    Returns:
        The number of rows (at least 1).

    Raises:
        TypeError: If the inputs hold no tensor.
        ValueError: If no tensor has a dimension 0, the batch is empty, or the input
            tensors disagree on the batch size and the targets do not settle it.
    """
    leaves = tensor_leaves(inputs)
    if not leaves:
        raise TypeError(f"cannot find a batch dimension in inputs of type {type(inputs).__name__}")
    sizes: dict[int, list[str]] = {}
    for path, t in leaves:
        if t.dim():
            sizes.setdefault(int(t.shape[0]), []).append(path)
    if not sizes:
        raise ValueError(
            "inputs must hold the examples in dimension 0 (a batch), got only 0-d tensors "
            f"{[p for p, _ in leaves][:5]}"
        )
    if isinstance(inputs, Tensor):
        rows = int(inputs.shape[0])
    elif targets is not None and targets.dim() and int(targets.shape[0]) in sizes:
        rows = int(targets.shape[0])
    else:
        big = sorted(s for s in sizes if s != 1)
        if len(big) > 1:
            found = {paths[0]: s for s, paths in sorted(sizes.items())}
            raise ValueError(
                "inputs: the batch size is ambiguous, the tensors' dimension-0 sizes differ "
                f"({found}); give targets whose dimension 0 is the batch size, or inputs that "
                "share it (a size-1 dimension 0 broadcasts)"
            )
        rows = big[0] if big else 1
    if rows == 0:
        raise ValueError(
            f"inputs: a batch must have at least one row, got an empty batch (shapes "
            f"{[tuple(t.shape) for _, t in leaves][:5]})"
        )
    return rows


def is_batched(value: Any, rows: int) -> bool:
    """Whether ``value`` is a tensor carrying the batch (``rows``) in dimension 0."""
    return isinstance(value, Tensor) and value.dim() > 0 and int(value.shape[0]) == rows


def select_rows(inputs: Any, start: int, stop: int, rows: int) -> Any:
    """Rows ``start:stop`` of a batch; tensors without the batch in dimension 0 unchanged."""
    if isinstance(inputs, Tensor):
        return inputs[start:stop] if is_batched(inputs, rows) else inputs
    if isinstance(inputs, Mapping):
        return {k: select_rows(v, start, stop, rows) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(select_rows(v, start, stop, rows) for v in inputs)
    return inputs


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
