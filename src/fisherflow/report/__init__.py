"""Reports and plots of Fisher matrices (matplotlib, Agg backend)."""

from fisherflow.report.plots import effective_dimension, heatmaps, spectra, summary

__all__ = ["effective_dimension", "heatmaps", "spectra", "summary"]
