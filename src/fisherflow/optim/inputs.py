"""The inputs of a model's training forwards: the batches an optimizer's curvature is of."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fisherflow.optim.modes import inside_estimation

__all__ = ["InputRecorder"]


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
