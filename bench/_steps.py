"""Interleaved, timed optimizer steps and their ratios: the loop the optimizer benches share.

Every run takes one step on the same batch in turn (so the machine's load hits them
alike); a step's time covers ``zero_grad``, the forward, the backward and ``step``. A
run that raises or whose loss is not finite is recorded as failed and skipped from
then on: a failing peer is a result to report.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

K = TypeVar("K", bound=Hashable)


def timed_round(
    runs: Mapping[K, tuple[nn.Module, Any]],
    loss_of: Callable[[nn.Module], torch.Tensor],
    times: dict[K, list[float]],
    failed: dict[K, str],
    step: int,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """One step of every run that has not failed, each timed into ``times[key]``.

    ``clock``: wall time by default; ``time.thread_time`` times the CPU the step used
    in this thread (with one torch thread, the whole step), robust to other load.
    """
    for key, (model, opt) in runs.items():
        if key in failed:
            continue
        t0 = clock()
        try:
            opt.zero_grad()
            loss = loss_of(model)
            loss.backward()
            opt.step()
        except Exception as err:  # a failing run is a result to report
            failed[key] = f"{type(err).__name__}: {str(err)[:120]}"
            continue
        times[key].append(clock() - t0)
        if not math.isfinite(loss.item()):
            failed[key] = f"diverged at step {step}"


def ratio_cells(times: list[float], base: list[float] | None) -> tuple[str, str, str]:
    """``(amortized, median, min)`` of a run's step times over the baseline's, as ``1.23×``.

    Amortized: total time over the baseline's total on the same rounds (refresh steps
    included); median and min: of the per-round ratios. ``–`` without a baseline.
    """
    if not base or not times:
        return "–", "–", "–"
    ratios = [a / b for a, b in zip(times, base, strict=False)]
    amortized = sum(times) / sum(base[: len(times)])
    return f"{amortized:.2f}×", f"{statistics.median(ratios):.2f}×", f"{min(ratios):.2f}×"
