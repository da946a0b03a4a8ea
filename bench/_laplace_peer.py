"""One timed cell of fisherflow's Laplace against laplace-torch, shared by the benchmarks.

``bench_laplace.py`` (a synthetic MLP) and ``bench_uncertainty.py`` (the MNIST MLP)
time the same thing: fit + GLM probit predictive, interleaved, same model, data and
prior. :func:`speedups` summarises a cell the same way for both tables.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

import fisherflow as ff


def laplace_cell(
    model: nn.Module,
    loader: Any,
    x: Tensor,
    *,
    theirs: str,
    ours: str,
    subset: str = "all",
    reps: int,
    chunk: int | None = None,
) -> tuple[list[float], list[float], float]:
    """Time ``reps`` interleaved fit + probit predictions of both libraries.

    Args:
        model: The trained model.
        loader: A ``DataLoader`` of ``(x, y)`` (laplace-torch's input; fisherflow gets
            its batches as a list).
        x: Inputs to predict on.
        theirs: laplace-torch's ``hessian_structure`` (``"diag"``, ``"kron"``).
        ours: fisherflow's structure (``"diagonal"``, ``"kfac"``).
        subset: ``"all"`` or ``"last_layer"``.
        reps: Repetitions, each timing laplace-torch then fisherflow.
        chunk: Rows per prediction chunk (``None``: all at once).

    Returns:
        ``(fisherflow seconds, laplace-torch seconds, max probability difference)``.
    """
    from laplace import Laplace as TorchLaplace

    batches = list(loader)
    rows = [x] if chunk is None else list(x.split(chunk))
    ff_times: list[float] = []
    lt_times: list[float] = []
    diff = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lt = TorchLaplace(
                model,
                "classification",
                subset_of_weights=subset,
                hessian_structure=theirs,
                prior_precision=1.0,
            )
            lt.fit(loader)
            p_lt = torch.cat([lt(xc, pred_type="glm", link_approx="probit") for xc in rows])
        lt_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        la = ff.Laplace(
            model,
            likelihood="categorical",
            structure=ours,
            params="last_layer" if subset == "last_layer" else None,
            prior_precision=1.0,
        )
        la.fit(batches, progress=False)
        p_ff = la.predict(x, method="probit", batch_size=chunk)
        assert isinstance(p_ff, Tensor)
        ff_times.append(time.perf_counter() - start)
        diff = max(diff, float((p_ff.float() - p_lt.float()).abs().max()))
    return ff_times, lt_times, diff


def speedups(ff_times: list[float], lt_times: list[float]) -> tuple[float, float, float, float]:
    """Median seconds of fisherflow and laplace-torch, then min and median of their ratio.

    The ratio is laplace-torch's time over fisherflow's, repetition by repetition (the
    two ran back to back).
    """
    ratio = [a / b for a, b in zip(lt_times, ff_times, strict=True)]
    return (
        statistics.median(ff_times),
        statistics.median(lt_times),
        min(ratio),
        statistics.median(ratio),
    )
