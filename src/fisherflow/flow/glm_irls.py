"""Full-batch Fisher scoring (IRLS) by streaming passes over re-iterable data.

Each pass accumulates the score and expected information of every batch at fixed
coefficients (:func:`accumulate_pass`), sums them across ranks when a process group
is given (:func:`all_reduce_pass`), and takes one penalised scoring step
(:func:`irls`). At convergence the coefficients are the (penalised) MLE of the data
and the information is that of a full-batch fit (McCullagh & Nelder 1989, §2.5;
Green 1984, *Iteratively reweighted least squares*).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fisherflow.distributed import all_reduce_sum
from fisherflow.flow._common import flat_layout, pinv_dense
from fisherflow.flow.families import Family, glm_score_information
from fisherflow.flow.glm_input import DTYPE, GLMBatch, output_kind
from fisherflow.matrices import Dense

__all__ = ["IRLSFit", "accumulate_pass", "all_reduce_pass", "irls"]

#: ``read(X, y, sample_weight, names) -> GLMBatch``: validates one batch.
Reader = Callable[[Any, Any, Any, "list[str] | None"], GLMBatch]


def correct_side(y: Tensor, eta: Tensor, active: Tensor) -> int:
    """Observations strictly on the correct side of ``η = 0``."""
    return int((((y == 1) & (eta > 0)) | ((y == 0) & (eta < 0)))[active].sum())


def accumulate_pass(
    family: Family,
    batches: Iterable[Any],
    beta: Tensor | None,
    names: list[str] | None,
    read: Reader,
    probe: Tensor | None = None,
) -> dict[str, Any]:
    """Score, information and totals of one pass at ``beta`` (and at ``probe``).

    With ``beta=None`` (a fresh model) only the first batch is read, to learn the
    width ``p`` and the column names.

    Raises:
        ValueError: On a malformed batch or no observations at all.
    """
    acc: dict[str, Any] = {
        "U": 0.0,
        "J": 0.0,
        "Up": 0.0,
        "Jp": 0.0,
        "correct_p": -1,
        "ll": 0.0,
        "n": 0.0,
        "yy": 0.0,
        "xy": 0.0,
        "rows": 0,
        "correct": 0,
        "binary": True,
        "kind": None,
    }
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError(
                f"each batch must be (X, y) or (X, y, sample_weight), got {type(batch).__name__}"
            )
        b = read(batch[0], batch[1], batch[2] if len(batch) == 3 else None, names)
        if names is None:
            names = b.names
        if acc["kind"] is None:
            acc["kind"] = output_kind(batch[0])
        if beta is None:  # first pass on a fresh model only discovers the width
            acc["p"], acc["names"] = b.X.shape[1], names
            return acc
        U, J, ll, eta = glm_score_information(family, b.X, b.y, b.w, beta)
        acc["U"] = acc["U"] + U
        acc["J"] = acc["J"] + J
        acc["ll"] += float(ll)
        acc["n"] += float(b.freq.sum())
        if family.has_scale:
            acc["yy"] = acc["yy"] + (b.w * b.y * b.y).sum()
            acc["xy"] = acc["xy"] + b.X.T @ (b.w * b.y)
        active = b.w > 0
        acc["rows"] += int(active.sum())
        acc["binary"] = acc["binary"] and bool(((b.y == 0) | (b.y == 1))[active].all())
        acc["correct"] += correct_side(b.y, eta, active)
        if probe is not None:
            Up, Jp, _, eta_p = glm_score_information(family, b.X, b.y, b.w, probe)
            acc["Up"], acc["Jp"] = acc["Up"] + Up, acc["Jp"] + Jp
            acc["correct_p"] = max(acc["correct_p"], 0) + correct_side(b.y, eta_p, active)
    if acc["rows"] == 0:
        raise ValueError("refine got no observations (empty data)")
    return acc


def all_reduce_pass(acc: dict[str, Any], group: Any) -> dict[str, Any]:
    """Sum one pass's statistics over ranks (``binary`` holds when it holds on every rank)."""
    out = dict(acc)
    for key in ("U", "J", "yy", "xy", "Up", "Jp"):
        out[key] = all_reduce_sum(torch.as_tensor(acc[key], dtype=DTYPE), group)
    counts = [acc["ll"], acc["n"], acc["rows"], acc["correct"], acc["correct_p"]]
    sums = all_reduce_sum(torch.tensor([*counts, float(not acc["binary"])], dtype=DTYPE), group)
    out["ll"], out["n"] = float(sums[0]), float(sums[1])
    out["rows"], out["correct"], out["binary"] = int(sums[2]), int(sums[3]), float(sums[5]) == 0
    out["correct_p"] = int(sums[4]) if acc["correct_p"] >= 0 else -1
    return out


@dataclass
class IRLSFit:
    """Result of :func:`irls`.

    Attributes:
        beta: Coefficients after the last step.
        information: Penalised information ``J + λI`` at the last pass.
        stats: The last pass's statistics (``n``, ``ll``, ``yy``, ``xy``, ``kind``...).
        names: Column names.
        converged: Whether a step met the tolerance.
        n_iter: Passes run.
        separated: Whether a binary outcome was perfectly separated.
    """

    beta: Tensor
    information: Tensor
    stats: dict[str, Any]
    names: list[str]
    converged: bool
    n_iter: int
    separated: bool


def irls(
    family: Family,
    passes: Callable[[], Iterable[Any]],
    beta: Tensor | None,
    names: list[str] | None,
    read: Reader,
    *,
    penalty: float,
    n_iter: int,
    tol: float,
    group: Any = None,
) -> IRLSFit:
    """Penalised Fisher scoring by streaming passes, from ``beta`` (zeros if ``None``).

    With a penalty the fit stays finite on separated data; an unpenalised probe
    iterate run alongside reveals the separation (it classifies everything).

    Raises:
        FloatingPointError: If a step is not finite.
        ValueError: On invalid batches.
    """
    probe = beta.clone() if beta is not None and family.binary and penalty > 0 else None
    converged = separated = False
    it = 0
    acc: dict[str, Any] = {}
    J = torch.zeros(0)
    for it in range(1, n_iter + 1):  # noqa: B007
        acc = accumulate_pass(family, passes(), beta, names, read, probe)
        if beta is None:
            beta = torch.zeros(acc["p"], dtype=DTYPE)
            probe = beta.clone() if family.binary and penalty > 0 else None
            names = acc["names"]
            acc = accumulate_pass(family, passes(), beta, names, read, probe)
        if group is not None:
            acc = all_reduce_pass(acc, group)
        separated = separated or (
            family.binary
            and acc["binary"]
            and (acc["correct"] == acc["rows"] or acc["correct_p"] == acc["rows"])
        )
        if probe is not None:
            p_step = pinv_dense(Dense(acc["Jp"], flat_layout(probe.numel()))) @ acc["Up"]
            probe = probe + p_step if torch.isfinite(p_step).all() else probe
        U = acc["U"] - penalty * beta
        J = acc["J"] + penalty * torch.eye(beta.shape[0], dtype=DTYPE)
        step = pinv_dense(Dense(J, flat_layout(beta.numel()))) @ U
        if not torch.isfinite(step).all():
            raise FloatingPointError("Fisher scoring produced a non-finite step; model unchanged")
        small = bool((step.abs() <= tol * (1 + beta.abs())).all())
        beta = beta + step
        if small:
            converged = True
            break
    if beta is None or names is None:  # pragma: no cover - n_iter >= 1 sets both
        raise ValueError("refine ran no pass")
    return IRLSFit(beta, J, acc, names, converged, it, separated)
