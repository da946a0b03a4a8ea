"""``fisherflow demo`` section: EWC against forgetting, Fisher merging against averaging.

On scikit-learn's digits: (1) three permuted-pixel tasks learnt one after another by
a small MLP, with and without an online EWC penalty (diagonal and K-FAC Fisher),
the accuracy on the first task after every epoch (the forgetting curve); (2) two
copies of one model fine-tuned on disjoint halves of the classes, merged by plain
averaging and by Fisher-weighted merging (diagonal, K-FAC), joint accuracy on all
ten classes. The helpers here are reused by ``bench/bench_continual.py`` and
``bench/bench_merge.py``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fisherflow.cli.demo_data import digits, train

__all__ = ["accuracy", "demo_section", "mlp", "permuted_tasks"]

Task = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_test, y_test


def mlp(d_in: int, hidden: int = 32, d_out: int = 10, seed: int = 0) -> nn.Module:
    """A one-hidden-layer ReLU MLP (fixed seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``argmax model(x) == y``."""
    return float((model(x).argmax(-1) == y).float().mean())


def permuted_tasks(x: Tensor, y: Tensor, n_tasks: int, n_train: int, seed: int = 0) -> list[Task]:
    """Tasks that permute the input features, each with a train/test split.

    Task 0 keeps the identity permutation (Goodfellow et al., 2013; Kirkpatrick et
    al., 2017, "permuted MNIST").
    """
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        perm = torch.arange(x.shape[1]) if t == 0 else torch.randperm(x.shape[1], generator=g)
        xp = x[:, perm]
        tasks.append((xp[:n_train], y[:n_train], xp[n_train:], y[n_train:]))
    return tasks


def _continual(
    tasks: Sequence[Task], structure: str | None, strength: float, epochs: int
) -> list[float]:
    """Accuracy on task 0 after each epoch of each task (online EWC if ``structure``)."""
    from fisherflow.apps import EWC
    from fisherflow.estimation import estimate

    model = mlp(tasks[0][0].shape[1])
    curve: list[float] = []
    ewc: EWC | None = None
    for t, (x, y, _, _) in enumerate(tasks):
        train(
            model,
            x,
            y,
            epochs=epochs,
            penalty=None if ewc is None else ewc.penalty,
            each_epoch=lambda: curve.append(accuracy(model, tasks[0][2], tasks[0][3])),
            seed=t,
        )
        if structure is not None:
            data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]
            F = estimate(model, data, "categorical", "exact", structure, progress=False)
            F = (strength / F.num_samples) * F  # per observation of the next task's mean loss
            ewc = EWC(F, model) if ewc is None else ewc.consolidate(F, model)
    return curve


def _plot(curves: dict[str, list[float]], epochs: int, path: Path) -> Path:
    from fisherflow.report import new_figure, save_figure

    fig = new_figure(6, 3.2)
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=label)
    for k in range(1, len(next(iter(curves.values()))) // epochs):
        ax.axvline(k * epochs + 0.5, color="grey", lw=0.5)
    ax.set(xlabel="epoch (tasks 1, 2, 3)", ylabel="accuracy on task 1", ylim=(0, 1))
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _merge_demo(x: Tensor, y: Tensor) -> list[tuple[str, float]]:
    """Two fine-tunes of one model on classes 0-4 and 5-9, merged several ways."""
    from fisherflow.apps import merge
    from fisherflow.estimation import estimate

    n = 1200
    xt, yt, xs, ys = x[:n], y[:n], x[n:], y[n:]
    base = mlp(64, hidden=48)
    train(base, xt[:300], yt[:300], epochs=10)  # the common starting point
    models, halves = [], []
    for lo in (0, 5):
        keep = (yt >= lo) & (yt < lo + 5)
        m = copy.deepcopy(base)
        train(m, xt[keep], yt[keep], epochs=5, lr=3e-3, seed=lo)
        models.append(m)
        halves.append([(xt[keep], yt[keep])])
    rows = [("common starting point", accuracy(base, xs, ys))]
    rows += [
        (f"model fine-tuned on {lo}-{lo + 4}", accuracy(m, xs, ys))
        for lo, m in zip((0, 5), models, strict=True)
    ]
    avg = copy.deepcopy(base)
    avg.load_state_dict(
        {
            k: (a + b) / 2
            for (k, a), b in zip(
                models[0].state_dict().items(), models[1].state_dict().values(), strict=True
            )
        }
    )
    rows.append(("plain average", accuracy(avg, xs, ys)))
    for structure in ("diagonal", "kfac"):
        Fs = [
            estimate(m, d, "categorical", "exact", structure, progress=False)
            for m, d in zip(models, halves, strict=True)
        ]
        merged = copy.deepcopy(base)
        merged.load_state_dict(merge(models, Fs, damping=1e-3))
        rows.append((f"Fisher merge ({structure})", accuracy(merged, xs, ys)))
    return rows


def demo_section(out: Path) -> list[str]:
    """Markdown lines of the section; writes ``ewc_forgetting.png`` into ``out``."""
    start = time.perf_counter()
    x, y = digits(torch.float32)
    tasks = permuted_tasks(x, y, n_tasks=3, n_train=1200)
    epochs = 3
    curves = {
        "fine-tuning": _continual(tasks, None, 0.0, epochs),
        "online EWC, diagonal": _continual(tasks, "diagonal", 100.0, epochs),
        "online EWC, K-FAC": _continual(tasks, "kfac", 100.0, epochs),
    }
    plot = _plot(curves, epochs, Path(out) / "ewc_forgetting.png")
    rows = _merge_demo(x, y)
    lines = [
        "## Using the Fisher: EWC and merging",
        "",
        "**Continual learning.** An MLP learns three permuted-pixel versions of digits "
        f"one after another ({epochs} epochs each, 1200 training images). Fine-tuning "
        "forgets task 1; online EWC (`ff.apps.EWC`, penalty "
        "λ/2·(θ−θ*)ᵀF(θ−θ*) with the exact Fisher per observation, λ = 100) keeps it.",
        "",
        "| method | task-1 accuracy after task 1 | after task 3 |",
        "|---|---|---|",
        *[f"| {k} | {c[epochs - 1]:.3f} | {c[-1]:.3f} |" for k, c in curves.items()],
        "",
        f"![forgetting curves]({plot.name})",
        "",
        "**Merging.** One model fine-tuned on digits 0-4, a copy on 5-9 (from a common "
        "start trained briefly on 300 images of all classes); accuracy on all ten classes "
        "of held-out digits (`ff.apps.merge` with each model's exact Fisher on its own "
        "half, damping 1e-3). On this small task Fisher merging is about as good as "
        "plain averaging; `bench/bench_merge.py` measures it on MNIST.",
        "",
        "| model | accuracy on 0-9 |",
        "|---|---|",
        *[f"| {name} | {acc:.3f} |" for name, acc in rows],
        "",
        f"(section computed in {time.perf_counter() - start:.1f} s)",
        "",
    ]
    return lines
