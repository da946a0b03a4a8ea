"""The ``fisherflow demo`` uncertainty section: calibration and OOD on digits.

An MLP trained on scikit-learn digits is compared, on held-out digits, as a point
estimate (MAP), after temperature scaling, and under a last-layer K-FAC Laplace posterior
(``ff.Laplace``, prior precision by marginal likelihood, probit predictive):
reliability diagrams, then the predictive entropy on in-distribution digits against
rotated digits and uniform noise, with the OOD AUROC of each score.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from fisherflow.cli.demo_data import digits, train

__all__ = ["demo_section"]


def _plots(
    out: Path,
    probs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    entropies: dict[str, dict[str, torch.Tensor]],
) -> tuple[Path, Path]:
    from fisherflow.report import new_figure, save_figure
    from fisherflow.uncertainty import reliability_diagram

    fig = new_figure(4 * len(probs), 4)
    axes = fig.subplots(1, len(probs))
    for ax, (name, p) in zip(axes, probs.items(), strict=True):
        reliability_diagram(p, labels, n_bins=10, ax=ax, label=name)
        ax.set_title(name)
    rel = save_figure(fig, out / "uncertainty_reliability.png", dpi=90)
    fig = new_figure(5 * len(entropies), 3.5)
    axes = fig.subplots(1, len(entropies))
    for ax, (name, sets) in zip(axes, entropies.items(), strict=True):
        for label, h in sets.items():
            ax.hist(h.numpy(), bins=30, range=(0, 2.31), alpha=0.5, density=True, label=label)
        ax.set_title(f"{name}: predictive entropy")
        ax.set_xlabel("entropy (nats)")
        ax.legend()
    ent = save_figure(fig, out / "uncertainty_entropy.png", dpi=90)
    return rel, ent


def demo_section(out: Path) -> list[str]:
    """Train, calibrate, fit a K-FAC Laplace posterior and score OOD inputs on digits.

    Args:
        out: The report folder (two PNGs are written into it).

    Returns:
        Markdown lines of the section.
    """
    from fisherflow.uncertainty import Laplace, calibration, temperature_scale
    from fisherflow.uncertainty.ood import HIGHER_IS_OOD, ood_auroc, ood_scores

    start = time.perf_counter()
    x, y = digits(images=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    tr, va, te = slice(0, 1000), slice(1000, 1300), slice(1300, None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    train(model, x[tr].float(), y[tr], epochs=20)
    model = model.double()
    data = [(x[tr][i : i + 250], y[tr][i : i + 250]) for i in range(0, 1000, 250)]
    la = Laplace(model, likelihood="categorical", structure="kfac", params="last_layer")
    la.fit(data, progress=False)
    la.optimize_prior_precision("marglik")
    with torch.no_grad():
        logits_va, logits_te = model(x[va]), model(x[te])
    temp = temperature_scale(logits_va, y[va])
    laplace = la.predict(x[te], method="probit")
    assert isinstance(laplace, torch.Tensor)
    probs = {
        "MAP": torch.softmax(logits_te, 1),
        f"MAP, temperature {temp:.2f}": torch.softmax(logits_te / temp, 1),
        "K-FAC Laplace (probit)": laplace,
    }
    lines = [
        "## Uncertainty: calibration and out-of-distribution inputs",
        "",
        "An MLP (64-32-10) trained on 1000 digits; 300 held out to fit the temperature, "
        f"{len(x[te])} to test. The Laplace posterior is over the last layer (K-FAC Fisher), "
        f"with the prior precision that maximises the evidence (τ = "
        f"{float(la.prior_precision):.3g}).",
        "",
        "| predictive | accuracy | NLL | ECE | Brier |",
        "|---|---|---|---|---|",
    ]
    for name, p in probs.items():
        m = calibration(p, y[te], n_bins=10)
        lines.append(
            f"| {name} | {m['accuracy']:.3f} | {m['nll']:.3f} | {m['ece']:.3f} | {m['brier']:.3f} |"
        )
    gen = torch.Generator().manual_seed(0)
    shifted = {
        "rotated digits": torch.rot90(x[te], 1, (1, 2)),
        "uniform noise": torch.rand(len(x[te]), 8, 8, generator=gen, dtype=torch.float64),
    }
    scores = {"digits": ood_scores(la, x[te], n_samples=64, generator=gen)}
    scores |= {k: ood_scores(la, v, n_samples=64, generator=gen) for k, v in shifted.items()}
    with torch.no_grad():
        map_entropy = {
            k: torch.distributions.Categorical(logits=model(v)).entropy()
            for k, v in {"digits": x[te], **shifted}.items()
        }
    entropies = {
        "MAP": map_entropy,
        "K-FAC Laplace": {k: s.entropy for k, s in scores.items()},
    }
    rel, ent = _plots(out, probs, y[te], entropies)
    lines += [
        "",
        f"![reliability diagrams]({rel.name})",
        "",
        "OOD AUROC (digits against each shifted set; 0.5 is chance). The MAP row is the "
        "entropy of the point estimate; the others are the Laplace posterior's scores "
        "(`ff.uncertainty.ood_scores`).",
        "",
        "| score | " + " | ".join(shifted) + " |",
        "|---|" + "---|" * len(shifted),
        "| MAP entropy | "
        + " | ".join(f"{ood_auroc(map_entropy['digits'], map_entropy[k]):.3f}" for k in shifted)
        + " |",
    ]
    for name, higher in HIGHER_IS_OOD.items():
        a = getattr(scores["digits"], name)
        row = [f"{ood_auroc(a, getattr(scores[k], name), higher):.3f}" for k in shifted]
        lines.append(f"| Laplace {name.replace('_', ' ')} | " + " | ".join(row) + " |")
    lines += [
        "",
        f"![predictive entropy]({ent.name})",
        "",
        f"(section computed in {time.perf_counter() - start:.1f} s)",
        "",
    ]
    return lines
