"""The inputs of a model's training forwards: the batches an optimizer's curvature is of."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fisherflow.estimation.data import batch_rows, select_rows, split_batch
from fisherflow.optim.modes import inside_estimation

__all__ = ["InputRecorder", "first_rows"]


def first_rows(batches: list[Any], limit: int | None) -> tuple[list[Any], int, int]:
    """The first ``limit`` rows (examples) of micro-batches taken in order.

    A curvature estimated on a subset of each update's batch costs less in proportion
    (its capture forward, backward and Gram products are linear in the rows), and is
    an unbiased estimate of the whole batch's per-observation Fisher when the rows are
    exchangeable (shuffled data): the sum over ``k`` of ``B`` rows times ``B / k`` has
    the full sum's expectation (simple random sampling), with more variance.

    Args:
        batches: ``(inputs, targets)`` pairs or dicts with ``"labels"`` (the
            estimator's batch forms), oldest first.
        limit: Rows to keep (``None``: all).

    Returns:
        ``(kept batches, rows kept, rows in all batches)``; the last kept batch is cut
        with :func:`~fisherflow.estimation.data.select_rows`. ``(batches, 0, 0)``
        when ``limit`` is ``None`` (the rows are not counted).

    Example:
        >>> x = torch.zeros(6, 2)
        >>> kept, used, total = first_rows([(x[:4], None), (x[4:], None)], 5)
        >>> [b[0].shape[0] for b in kept], used, total
        ([4, 1], 5, 6)
    """
    if limit is None:  # nothing to cut: nothing counted
        return list(batches), 0, 0
    sizes = []
    for batch in batches:
        parts = split_batch(batch, shift_labels=False)
        sizes.append(batch_rows(parts.inputs, parts.targets))
    total = sum(sizes)
    if limit >= total:
        return list(batches), total, total
    kept, used = [], 0
    for batch, rows in zip(batches, sizes, strict=True):
        take = min(rows, limit - used)
        kept.append(batch if take == rows else select_rows(batch, 0, take, rows))
        used += take
        if used == limit:
            break
    return kept, used, total


class InputRecorder:
    """Keeps references to the inputs of a model's forwards while ``wanted()`` says so.

    A forward pre-hook records each forward run with gradients on, except those run
    by fisherflow's estimation code and those inside :meth:`feeding` (the
    optimizer's own curvature passes). The hook holds the recorder weakly and is
    removed with it.

    Args:
        model: The module whose forwards are recorded.
        wanted: Whether the next step needs the inputs (e.g. a curvature update is due).
    """

    def __init__(self, model: nn.Module, wanted: Callable[[], bool]) -> None:
        self.wanted = wanted
        self.inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._feeding = False
        ref = weakref.ref(self)

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            recorder = ref()
            if recorder is not None:
                recorder._record(args, kwargs)

        self._hook = model.register_forward_pre_hook(record, with_kwargs=True)

    def _record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._feeding and torch.is_grad_enabled() and self.wanted():
            if not inside_estimation():
                self.inputs.append((args, kwargs))

    def clear(self) -> None:
        """Forget the recorded inputs."""
        self.inputs = []

    @contextlib.contextmanager
    def feeding(self) -> Iterator[None]:
        """Forwards inside this block (the optimizer's own passes) are not recorded."""
        self._feeding = True
        try:
            yield
        finally:
            self._feeding = False

    def batches(self) -> list[tuple[Any, None]]:
        """The recorded inputs as ``(inputs, None)`` batches, oldest first.

        Raises:
            RuntimeError: If no forward was recorded.
            ValueError: If a forward took other than one positional input.
        """
        if not self.inputs:
            raise RuntimeError(
                "step(): no forward of the model with gradients on was seen since the last "
                "curvature update; run the model's forward before step() or pass batch="
            )
        out = []
        for args, kwargs in self.inputs:
            if len(args) != 1 or kwargs:
                raise ValueError(
                    "batch: the model's forward took "
                    f"{len(args)} positional and {len(kwargs)} keyword inputs; the curvature "
                    "needs one input tensor: pass opt.step(batch=(inputs, None))"
                )
            out.append((args[0], None))
        return out

    def __del__(self) -> None:
        hook = self.__dict__.get("_hook")
        if hook is not None:
            hook.remove()
