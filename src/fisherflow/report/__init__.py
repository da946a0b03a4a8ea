"""Reports and plots of Fisher matrices (matplotlib, Agg backend), written atomically."""

from fisherflow.report.files import atomic_path, write_text
from fisherflow.report.plots import (
    effective_dimension,
    heatmaps,
    new_figure,
    save_figure,
    spectra,
    summary,
)

__all__ = [
    "atomic_path",
    "effective_dimension",
    "heatmaps",
    "new_figure",
    "save_figure",
    "spectra",
    "summary",
    "write_text",
]
