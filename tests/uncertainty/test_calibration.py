"""Calibration metrics agree with torchmetrics and scikit-learn; temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

import fisherflow as ff


@pytest.mark.parametrize("classes", [2, 5])
def test_metrics_agree_with_the_libraries(classes):
    gen = torch.Generator().manual_seed(classes)
    probs = torch.softmax(2 * torch.randn(500, classes, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, classes, (500,), generator=gen)
    out = ff.uncertainty.calibration(probs, labels, n_bins=15)
    ece = MulticlassCalibrationError(num_classes=classes, n_bins=15, norm="l1")(probs, labels)
    mce = MulticlassCalibrationError(num_classes=classes, n_bins=15, norm="max")(probs, labels)
    acc = MulticlassAccuracy(num_classes=classes, average="micro")(probs, labels)
    assert out["ece"] == pytest.approx(float(ece), abs=1e-6)
    assert out["mce"] == pytest.approx(float(mce), abs=1e-6)
    assert out["accuracy"] == pytest.approx(float(acc), abs=1e-6)
    assert out["nll"] == pytest.approx(log_loss(labels.numpy(), probs.numpy()), rel=1e-10)
    # Brier: mean over samples of Σ_c (p_c − 1[y = c])², checked by hand too
    onehot = np.eye(classes)[labels.numpy()]
    brier = float(((probs.numpy() - onehot) ** 2).sum(1).mean())
    assert out["brier"] == pytest.approx(brier, rel=1e-10)
    if classes > 2:
        assert out["brier"] == pytest.approx(brier_score_loss(labels.numpy(), probs.numpy()))
    # the ECE is the count-weighted mean gap of the reliability bins
    bins = ff.uncertainty.reliability_bins(probs, labels, 15)
    gap = (bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / 500
    assert out["ece"] == pytest.approx(float(gap), abs=1e-6)
    # arrays are accepted; adaptive ECE bins hold equal counts
    again = ff.uncertainty.calibration(probs.numpy(), labels.numpy())
    assert again == pytest.approx(out)
    assert 0 <= out["ece_adaptive"] <= 1


def test_adaptive_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    # two bins of two: conf (0.6, 0.7) acc (1, 1) → 0.35; conf (0.8, 0.9) acc (0, 1) → 0.35
    assert ff.uncertainty.adaptive_ece(probs, labels, 2) == pytest.approx(0.35)


def test_temperature_scale_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    true_logits = 2 * torch.randn(4000, 4, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=gen)[:, 0]
    T = ff.uncertainty.temperature_scale(3.0 * true_logits, labels)  # over-confident by 3
    assert T == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (torch.ones(3), torch.zeros(3, dtype=torch.long), "shape"),
        (torch.full((2, 2), 0.7), torch.zeros(2, dtype=torch.long), "sum to 1"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), "labels must lie"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), "integer"),
        (torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]), "finite"),
    ],
)
def test_bad_input(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        ff.uncertainty.calibration(probs, labels)


def test_reliability_diagram_draws():
    import matplotlib

    matplotlib.use("Agg")
    probs = torch.softmax(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)), 1)
    ax = ff.uncertainty.reliability_diagram(probs, torch.zeros(50, dtype=torch.long), label="MAP")
    assert "ECE" in ax.get_legend().get_texts()[0].get_text()
    import matplotlib.pyplot as plt

    plt.close("all")
