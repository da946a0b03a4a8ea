"""Plots and summaries of Fisher matrices: log-|entry| heatmaps, spectra, a summary dict.

matplotlib is used through its object API on an Agg canvas (no pyplot state, no
backend switch in the caller's session) and imported inside the functions.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fisherflow.matrices import FisherMatrix, ParamLayout
from fisherflow.report.files import atomic_path

__all__ = [
    "FLOOR_DECADES",
    "SPECTRUM_FLOOR",
    "effective_dimension",
    "heatmaps",
    "layer_spans",
    "new_figure",
    "save_figure",
    "spectra",
    "summary",
]

#: Decades of ``log10 |F_ij|`` a heatmap's colour scale spans below its largest entry.
FLOOR_DECADES = 8.0
#: Eigenvalues at or below this fraction of the largest are drawn on the spectrum's floor.
SPECTRUM_FLOOR = 1e-12

# Line styles and markers cycled together so that curves that coincide (K-FAC under
# EKFAC) stay distinguishable.
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")


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


def layer_spans(layout: ParamLayout) -> list[tuple[str, int, int]]:
    """``(layer, start, stop)`` per layer: consecutive parameters sharing a module prefix.

    Example:
        >>> layer_spans(ParamLayout.from_shapes({"0.weight": (2, 3), "0.bias": (2,), "2.w": (4,)}))
        [('layer 0', 0, 8), ('layer 2', 8, 12)]
    """
    spans: list[tuple[str, int, int]] = []
    for name in layout.names:
        prefix = name.rpartition(".")[0] or name
        label = f"layer {prefix}" if prefix.isdigit() else prefix
        sl = layout.slice(name)
        if spans and spans[-1][0] == label and spans[-1][2] == sl.start:
            spans[-1] = (label, spans[-1][1], sl.stop)
        else:
            spans.append((label, sl.start, sl.stop))
    return spans


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` drawn by the Agg canvas, outside pyplot.

    Nothing global changes: the caller's pyplot backend and open figures are left
    alone, and the figure is freed with its last reference (no ``plt.close``).

    Args:
        width: Width in inches.
        height: Height in inches.

    Returns:
        The figure (constrained layout); add axes with ``fig.subplots(...)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG atomically (a temporary file renamed into place).

    Args:
        fig: A matplotlib figure.
        path: The ``.png`` file to write.
        dpi: Resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _caption(fig: Any, text: str) -> None:
    """Centred 8-pt text under the axes, wrapped to the figure's width (≈ 13 chars/inch).

    The layout keeps the axes above it (≈ 0.16 inch per line).
    """
    lines = textwrap.wrap(text, int(fig.get_figwidth() * 13))
    fig.text(0.5, 0.005, "\n".join(lines), ha="center", va="bottom", fontsize=8)
    bottom = min((0.16 * len(lines) + 0.08) / fig.get_figheight(), 0.4)
    fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))


def _mark_layers(ax: Any, spans: list[tuple[str, int, int]], size: int) -> None:
    """Layer boundaries as lines and layer names as ticks on both axes."""
    for _, start, _stop in spans[1:]:
        for line in (ax.axhline, ax.axvline):
            line(start - 0.5, color="#00e5ff", lw=0.8)
    ticks = [(start + stop - 1) / 2 for _, start, stop in spans]
    labels = [label for label, _, _ in spans]
    fontsize = 8 if len(spans) <= 8 else 6
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.tick_params(length=0)
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)


def heatmaps(
    mats: Mapping[str, Tensor],
    path: str | Path,
    title: str = "",
    *,
    layout: ParamLayout | None = None,
    caption: str | None = None,
) -> Path:
    """Side-by-side ``log10 |F_ij|`` heatmaps with a shared colour scale.

    The scale spans :data:`FLOOR_DECADES` decades below the largest entry: smaller
    entries are drawn in the floor colour (black) and exact zeros in light grey, so
    zero stripes (parameters without information) and the blocks a structure does
    not represent stand out. With ``layout``, cyan lines mark layer boundaries and
    the ticks name the layers.

    Args:
        mats: Panel title → ``(P, P)`` matrix.
        path: Output PNG.
        title: Figure title.
        layout: Parameter layout of the matrices (layer boundaries and tick labels).
        caption: Text under the panels; default: how to read the colours.

    Returns:
        ``path``.
    """
    import numpy as np

    n = len(mats)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = new_figure(4.2 * cols + 1.0, 4.2 * rows + 0.9)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    absm = {k: v.detach().abs().double().cpu() for k, v in mats.items()}
    top = max((float(v.max()) for v in absm.values() if v.numel()), default=1.0)
    vmax = math.log10(top) if top > 0 else 0.0
    vmin = vmax - FLOOR_DECADES
    spans = layer_spans(layout) if layout is not None else None
    from matplotlib import colormaps

    cmap = colormaps["magma"].with_extremes(bad="#d9d9d9")
    im = None
    for ax, (name, m) in zip(axes, absm.items(), strict=False):
        logs = np.ma.masked_equal(m.numpy(), 0.0)
        logs = np.ma.log10(logs)
        # Nearest-neighbour sampling keeps single zero rows visible (averaging would
        # wash them out); 110 dpi keeps its moiré small up to P ≈ 1500.
        im = ax.imshow(logs, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        if spans is not None and layout is not None and layout.size == m.shape[0]:
            _mark_layers(ax, spans, m.shape[0])
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in axes[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(
            im,
            ax=list(axes[:n]),
            shrink=0.8,
            extend="min",
            label=f"log10 |F_ij| (floor: {vmin:.1f}, {FLOOR_DECADES:.0f} decades below the max)",
        )
    if title:
        fig.suptitle(title)
    if caption is None:
        caption = (
            f"Black: |F_ij| at or below the floor 10^{vmin:.1f}. Grey: exactly 0 — a "
            "parameter with no information (a zero stripe) or an entry the structure "
            "does not represent."
        )
    _caption(fig, caption)
    return save_figure(fig, path, dpi=110)


def spectra(
    eigs: Mapping[str, Tensor],
    path: str | Path,
    title: str = "",
    *,
    ylabel: str = "eigenvalue",
    caption: str | None = None,
) -> Path:
    """Descending spectra on a log scale, one line style and marker per curve.

    Values at or below :data:`SPECTRUM_FLOOR` times the largest value of all curves
    (numerically zero) are drawn on a dashed floor line.

    Args:
        eigs: Legend label → values (eigenvalues, or diagonal entries).
        path: Output PNG.
        title: Axes title.
        ylabel: What the values are.
        caption: Text under the axes; default: what the floor means.

    Returns:
        ``path``.
    """
    fig = new_figure(7.0, 4.8)
    ax = fig.subplots()
    vals = {
        k: torch.sort(v.detach().double().cpu(), descending=True).values for k, v in eigs.items()
    }
    top = max((float(v.max()) for v in vals.values() if v.numel()), default=1.0)
    floor = SPECTRUM_FLOOR * top if top > 0 else SPECTRUM_FLOOR
    for i, (name, v) in enumerate(vals.items()):
        y = v.clamp_min(floor).numpy()
        every = max(len(y) // 10, 1)
        ax.semilogy(
            y,
            linestyle=_STYLES[i % len(_STYLES)],
            marker=_MARKERS[i % len(_MARKERS)],
            markevery=(min(i * every // max(len(vals), 1), len(y) - 1), every),
            markersize=5,
            markerfacecolor="none",
            lw=1.4,
            label=name,
        )
    ax.axhline(
        floor, color="grey", lw=0.8, ls=(0, (2, 2)), label=f"floor: ≤ {SPECTRUM_FLOOR:g} × largest"
    )
    ax.set_ylim(bottom=floor / 10)
    ax.set_xlabel("index (largest first)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    if caption:
        _caption(fig, caption)
    return save_figure(fig, path)
