"""The pruning section of ``fisherflow demo``: held-out accuracy against sparsity on digits."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from fisherflow.cli.demo_data import digits

__all__ = ["SPARSITIES", "demo_section"]

#: Fractions of the weight matrices pruned in the demo.
SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9)


def demo_section(out: Path) -> list[str]:
    """Prune a digits MLP by magnitude, OBD and OBS at several sparsities; plot accuracy.

    Returns:
        Markdown lines (the plot is written into ``out``).
    """
    import torch
    from torch import nn

    from fisherflow.apps import prune
    from fisherflow.estimation import estimate

    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for i in range(0, len(train), 150):
            idx = train[i : i + 150]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    data = [(x[train[i : i + 200]], y[train[i : i + 200]]) for i in range(0, len(train), 200)]
    fishers = {
        s: estimate(model, data, "categorical", "exact", s, progress=False)
        for s in ("block", "kfac")
    }

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x[test]).argmax(1) == y[test]).double().mean())

    runs = {
        "magnitude": ("magnitude", None),
        "OBD (block Fisher diagonal)": ("obd", fishers["block"]),
        "OBS, K-FAC rows": ("obs", fishers["kfac"]),
        "OBS, block": ("obs", fishers["block"]),
    }
    dense_acc = accuracy(model)
    curves: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for label, (method, F) in runs.items():
        start = time.perf_counter()
        curves[label] = []
        for s in SPARSITIES:
            pruned = copy.deepcopy(model)
            prune(pruned, F, s, method=method, rel_damping=1e-2)
            curves[label].append(accuracy(pruned))
        seconds[label] = time.perf_counter() - start
    plot = _plot(curves, dense_acc, out / "pruning_accuracy.png")
    lines = [
        "## Pruning: accuracy against sparsity",
        "",
        f"A 64-16-10 MLP trained on 1200 digits (held-out accuracy {dense_acc:.3f} on "
        f"{len(test)} others) has both weight matrices pruned to each sparsity by "
        "`ff.apps.prune` (per layer, `rel_damping=0.01`). Magnitude keeps the largest "
        "|θ|; OBD the largest ½ F_qq θ² (the exact Fisher's diagonal); OBS the largest "
        "θ² / (2 [(F+λI)⁻¹]_qq) and then moves the kept weights of each unit to the "
        "minimiser of the Fisher's quadratic model (a K-FAC output row, or a whole "
        "layer's block). The Fishers are exact (categorical) on the training images.",
        "",
        "| method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | time (s) |",
        "|---|" + "---|" * (len(SPARSITIES) + 1),
    ]
    for label, accs in curves.items():
        cells = " | ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {label} | {cells} | {seconds[label]:.2f} |")
    return [*lines, "", f"![pruning accuracy]({plot.name})", ""]


def _plot(curves: dict[str, list[float]], dense: float, path: Path) -> Path:
    from fisherflow.report import new_figure, save_figure

    fig = new_figure(6, 4)
    ax = fig.subplots()
    for label, accs in curves.items():
        ax.plot([100 * s for s in SPARSITIES], accs, marker="o", label=label)
    ax.axhline(dense, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("weights pruned (%)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("digits MLP: accuracy against sparsity")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=90)
