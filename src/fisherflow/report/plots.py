"""Plots and summaries of Fisher matrices: log-|entry| heatmaps, spectra, a summary dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fisherflow.matrices import FisherMatrix
from fisherflow.report.files import atomic_path

__all__ = ["effective_dimension", "heatmaps", "spectra", "summary"]


def effective_dimension(eigvals: Tensor, damping: float) -> float:
    """``tr F (F + λI)⁻¹ = Σ_i λ_i / (λ_i + λ)`` from eigenvalues.

    Raises:
        ValueError: If ``damping`` is not > 0.

    Example:
        >>> effective_dimension(torch.tensor([1.0, 1.0, 0.0]), 1.0)
        1.0
    """
    if not damping > 0:
        raise ValueError(f"damping must be > 0 for the effective dimension, got {damping}")
    ev = eigvals.clamp_min(0).double()
    return float((ev / (ev + damping)).sum())


def summary(
    F: FisherMatrix,
    top: int = 10,
    dampings: Sequence[float] = (1e-3, 1e-1, 1.0),
    max_dense: int = 4000,
) -> dict[str, Any]:
    """Trace, top eigenvalues and effective dimensions of ``F``.

    Eigenvalues are cheap for diagonal, block, K-FAC and EKFAC at any size; dense and
    low-rank structures with a general diagonal need a P×P ``eigh``.
    """
    out: dict[str, Any] = {
        "structure": F.structure,
        "kind": F.kind,
        "likelihood": F.likelihood,
        "num_samples": F.num_samples,
        "parameters": F.size,
        "trace": float(F.trace()),
    }
    try:
        ev = F.eigvalsh()
    except (NotImplementedError, RuntimeError):
        ev = None
    if ev is not None:
        out["top_eigenvalues"] = [float(v) for v in ev[: min(top, F.size)]]
        out["effective_dimension"] = {str(d): effective_dimension(ev, d) for d in dampings}
    return out


def heatmaps(mats: Mapping[str, Tensor], path: str | Path, title: str = "") -> Path:
    """Side-by-side ``log10 |F_ij|`` heatmaps with a shared colour scale; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(mats)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False)
    logs = {k: torch.log10(v.detach().abs().double().cpu() + 1e-12) for k, v in mats.items()}
    vmax = max(float(v.max()) for v in logs.values())
    vmin = vmax - 8
    im = None
    for ax, (name, m) in zip(axes.flat, logs.items(), strict=False):
        im = ax.imshow(m.numpy(), vmin=vmin, vmax=vmax, cmap="magma", interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="log10 |F_ij|")
    fig.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def spectra(eigs: Mapping[str, Tensor], path: str | Path, title: str = "") -> Path:
    """Eigenvalue spectra (descending, log scale) of several matrices; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ev in eigs.items():
        v = torch.sort(ev.detach().double().cpu().clamp_min(1e-12), descending=True).values
        ax.semilogy(v.numpy(), label=name)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
