"""The pictures say what they show: layer ticks and boundaries, a caption, distinct lines."""

from __future__ import annotations

import pytest
import torch

from fisherflow.matrices import ParamLayout
from fisherflow.report import plots

LAYOUT = ParamLayout.from_shapes(
    {"enc.weight": (3, 4), "enc.bias": (3,), "1.weight": (2, 3), "1.bias": (2,)}
)


@pytest.fixture
def figures(monkeypatch):
    saved = []

    def keep(fig, path, dpi=100):
        saved.append(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    return saved


def test_layer_spans_group_parameters_by_module():
    assert plots.layer_spans(LAYOUT) == [("enc", 0, 15), ("layer 1", 15, 23)]


def test_heatmap_marks_layers_and_explains_zeros_and_floor(figures, tmp_path):
    F = torch.rand(23, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    F[2, :] = F[:, 2] = 0.0  # a zero stripe
    plots.heatmaps({"F": F, "G": 2 * F}, tmp_path / "h.png", "title", layout=LAYOUT)
    (fig,) = figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["enc", "layer 1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["enc", "layer 1"]
    boundaries = sorted({line.get_xdata()[0] for line in ax.lines if line.get_xdata()[0] > 0})
    assert boundaries == [14.5]
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "exactly 0" in caption and "floor" in caption
    image = ax.images[0].get_array()
    assert bool(image.mask[2].all()) and int(image.mask[3].sum()) == 1  # only column 2
    top = float(torch.log10(2 * F.max()))
    assert ax.images[0].get_clim() == pytest.approx((top - plots.FLOOR_DECADES, top))


def test_spectra_give_every_curve_its_own_style_and_a_floor(figures, tmp_path):
    ev = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    curves = {name: ev for name in ("exact", "K-FAC", "EKFAC", "block", "low-rank")}
    plots.spectra(curves, tmp_path / "s.png", "spectra")
    (fig,) = figures
    lines = [ln for ln in fig.axes[0].lines if ln.get_label() in curves]
    styles = {(ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len(styles) == len(curves)  # identical spectra stay distinguishable
    floor = 4.0 * plots.SPECTRUM_FLOOR
    assert all(float(ln.get_ydata()[-1]) == pytest.approx(floor) for ln in lines)
    assert any("floor" in str(ln.get_label()) for ln in fig.axes[0].lines)
