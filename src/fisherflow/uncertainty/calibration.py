"""Calibration of predicted class probabilities, and temperature scaling.

``ece`` and ``mce`` are torchmetrics' (15 equal-width bins of the top-label
confidence, L1 and max norms); ``nll`` and ``brier`` are scikit-learn's ``log_loss``
and multiclass ``brier_score_loss`` (the mean over samples of
``Σ_c (p_c − 1[y = c])²``, in ``[0, 2]``). The adaptive ECE (equal-mass bins, Nixon et
al. (2019), "Measuring calibration in deep learning", CVPR workshops) has no library
implementation that fisherflow depends on, so it is written here.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

__all__ = ["adaptive_ece", "calibration", "temperature_scale"]


def _as_probs(probs: Any, labels: Any) -> tuple[Tensor, Tensor]:
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, Tensor) else probs)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
    p, y = p.detach().cpu().to(torch.float64), y.detach().cpu()
    if p.dim() != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2, got {tuple(p.shape)}")
    if y.shape != (p.shape[0],) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"labels must be ({p.shape[0]},) integer class indices, got shape "
            f"{tuple(y.shape)} and dtype {y.dtype}"
        )
    if p.shape[0] == 0:
        raise ValueError("probs must hold at least one row, got 0")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or bool((p > 1).any()):
        raise ValueError("probs must be finite probabilities in [0, 1]")
    if not torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-4):
        raise ValueError("probs rows must sum to 1 (within 1e-4)")
    if bool((y < 0).any()) or bool((y >= p.shape[1]).any()):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got {y.min()}..{y.max()}")
    return p / p.sum(1, keepdim=True), y.long()  # float32 rows sum to 1 ± 1e-7


def adaptive_ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE over ``n_bins`` bins holding equal numbers of samples (sorted by confidence).

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices.
        n_bins: Number of bins (fewer when ``N < n_bins``).

    Returns:
        ``Σ_b (|B_b| / N) |acc(B_b) − conf(B_b)|``.

    Example:
        >>> p = torch.tensor([[0.75, 0.25], [0.75, 0.25]])  # confidence 0.75, accuracy 0.5
        >>> adaptive_ece(p, torch.tensor([0, 1]), 1)
        0.25
    """
    conf, pred = probs.max(1)
    order = torch.argsort(conf)
    correct = (pred == labels).to(torch.float64)[order]
    conf = conf.to(torch.float64)[order]
    total = 0.0
    for part_conf, part_ok in zip(
        torch.tensor_split(conf, n_bins), torch.tensor_split(correct, n_bins), strict=True
    ):
        if part_conf.numel():
            total += part_conf.numel() * abs(float(part_ok.mean() - part_conf.mean()))
    return total / conf.numel()


def calibration(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, float]:
    """Calibration and accuracy of class probabilities.

    Args:
        probs: ``(N, C)`` probabilities (tensor or array), rows summing to 1.
        labels: ``(N,)`` integer class indices.
        n_bins: Bins of the ECE, adaptive ECE and MCE.

    Returns:
        ``{"ece", "ece_adaptive", "mce", "nll", "brier", "accuracy"}`` as floats:
        ECE/MCE with torchmetrics' equal-width bins (L1/max), NLL (mean) and Brier
        (multiclass, ``[0, 2]``) with scikit-learn.

    Raises:
        ValueError: If ``probs`` is not ``(N, C)`` probabilities, the labels are out of
            range, or ``n_bins`` is not a positive integer.

    Example:
        >>> out = calibration(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
        >>> out["ece"], out["brier"], out["accuracy"]
        (0.0, 0.0, 1.0)
    """
    from sklearn.metrics import brier_score_loss, log_loss
    from torchmetrics.functional.classification import multiclass_calibration_error

    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, y = _as_probs(probs, labels)
    c = p.shape[1]

    def ce(norm: Literal["l1", "max"]) -> float:
        return float(multiclass_calibration_error(p, y, num_classes=c, n_bins=n_bins, norm=norm))

    classes = list(range(c))
    return {
        "ece": ce("l1"),
        "ece_adaptive": adaptive_ece(p, y, n_bins),
        "mce": ce("max"),
        "nll": float(log_loss(y.numpy(), p.numpy(), labels=classes)),
        "brier": float(brier_score_loss(y.numpy(), p.numpy(), labels=classes, scale_by_half=False)),
        "accuracy": float((p.argmax(1) == y).to(torch.float64).mean()),
    }


def temperature_scale(
    logits: Any, labels: Any, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)``.

    Guo et al. (2017), "On calibration of modern neural networks", ICML. A bounded
    one-dimensional search over ``log T`` (scipy).

    Args:
        logits: ``(N, C)`` logits (tensor or array).
        labels: ``(N,)`` class indices.
        bounds: Range of ``T``.

    Returns:
        ``T`` (divide the logits by it).

    Raises:
        ValueError: If the shapes are wrong or the logits are not finite.

    Example:
        >>> z = torch.tensor([[2.0, 0.0]] * 3 + [[0.0, 2.0]])  # 3 of 4 right at p = 0.88
        >>> y = torch.tensor([0, 0, 0, 0])
        >>> round(temperature_scale(z, y), 2)  # softmax(2 / T) = 3/4: T = 2 / log 3
        1.82
    """
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, Tensor) else logits)
    z = z.detach().cpu().to(torch.float64)
    if z.dim() != 2 or not bool(torch.isfinite(z).all()):
        raise ValueError(f"logits must be finite with shape (N, C), got {tuple(z.shape)}")
    _, y = _as_probs(torch.softmax(z, 1), labels)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y))

    lo, hi = bounds
    res = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded")
    return math.exp(float(res.x))
