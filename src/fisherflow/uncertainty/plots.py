"""Reliability diagrams (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from typing import Any

import torch

from fisherflow.uncertainty.calibration import _as_probs, calibration

__all__ = ["reliability_bins", "reliability_diagram"]


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per-bin confidence, accuracy and count over equal-width top-label confidence bins.

    The bins are torchmetrics' (``(k/n, (k+1)/n]``), so the count-weighted mean of
    ``|accuracy − confidence|`` is the ECE of :func:`calibration`.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices.
        n_bins: Number of bins.

    Returns:
        ``{"edges": (n_bins + 1,), "confidence", "accuracy", "count": (n_bins,)}``
        (empty bins have confidence and accuracy 0).

    Example:
        >>> out = reliability_bins(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1]), 2)
        >>> out["count"].tolist(), out["accuracy"].tolist()
        ([0.0, 2.0], [0.0, 0.5])
    """
    p, y = _as_probs(probs, labels)
    conf, pred = p.max(1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf, edges[1:-1], right=False)).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    csum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    asum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, (pred == y).double())
    safe = count.clamp_min(1)
    return {"edges": edges, "confidence": csum / safe, "accuracy": asum / safe, "count": count}


def reliability_diagram(
    probs: Any, labels: Any, n_bins: int = 15, ax: Any = None, label: str | None = None
) -> Any:
    """Draw accuracy against confidence per bin, with the diagonal of perfect calibration.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices.
        n_bins: Number of equal-width confidence bins.
        ax: A matplotlib ``Axes`` to draw on (default a new figure's).
        label: Legend label; the ECE is appended.

    Returns:
        The matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt

    bins = reliability_bins(probs, labels, n_bins)
    ece = calibration(probs, labels, n_bins)["ece"]
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    keep = bins["count"] > 0
    width = 1.0 / n_bins
    centers = (bins["edges"][:-1] + width / 2)[keep]
    ax.bar(
        centers.numpy(),
        bins["accuracy"][keep].numpy(),
        width=width,
        alpha=0.6,
        edgecolor="k",
        label=f"{label + ', ' if label else ''}ECE {ece:.3f}",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    return ax
