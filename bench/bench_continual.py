"""Continual learning on permuted MNIST: EWC variants against fine-tuning and L2.

Five tasks (task 1 = MNIST, tasks 2-5 = fixed pixel permutations), an MLP
784-256-256-10 trained with Adam one task after another. Methods (same λ for every
quadratic penalty, the Fisher taken per observation: ``λ/2 · (θ−θ*)ᵀ (F/N) (θ−θ*)``):

* fine-tuning; L2 to the previous parameters (F = I);
* EWC with a diagonal and with a K-FAC Fisher (MC kind, accumulated over tasks,
  anchored at the latest task: one penalty of all information);
* online EWC (diagonal, decay γ = 0.7, Schwarz et al. 2018);
* Fisher Flow (K-FAC, anchor = the information-weighted fusion of the tasks);
* EWC with Avalanche's importance rule (the square of each mini-batch's *mean*
  gradient, averaged over batches; Avalanche 0.6 itself does not import without
  torchvision here), at the same λ.

Reports final average accuracy over the 5 tasks and average forgetting (best
accuracy on a task minus its final accuracy, tasks 1-4), and the time of the K-FAC
EWC penalty plus its gradient against one forward+backward of the model.

Run: ``python bench/bench_continual.py`` (``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import fisherflow as ff
from _mnist import load_mnist
from fisherflow.cli.demo_data import train
from fisherflow.cli.demo_ewc_merge import accuracy, permuted_tasks


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def avalanche_importance(model: nn.Module, data: list) -> ff.Diagonal:
    """Avalanche's EWC importance: mean over batches of (mean-batch gradient)²."""
    layout = ff.ParamLayout.from_model(model)
    imp = torch.zeros(layout.size)
    for x, y in data:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        imp += torch.cat([p.grad.reshape(-1) for p in model.parameters()]) ** 2
    n = sum(len(b[1]) for b in data)
    # as a per-observation Fisher, summed over n observations (the scale EWC uses here)
    return ff.Diagonal(imp / len(data) * n, layout, num_samples=n)


def run_method(name: str, strength: float, tasks, args) -> list[list[float]]:
    model = make_model()
    ewc = None
    acc = []  # acc[t][k]: accuracy on task k after task t
    for t, (x, y, _, _) in enumerate(tasks):
        train(
            model,
            x,
            y,
            epochs=args.epochs,
            lr=1e-3,
            batch=128,
            seed=t,
            penalty=None if ewc is None else ewc.penalty,
        )
        acc.append([accuracy(model, xs, ys) for _, _, xs, ys in tasks])
        if name == "fine-tuning":
            continue
        fx, fy = x[: args.fisher_rows], y[: args.fisher_rows]
        data = [(fx[i : i + 250], fy[i : i + 250]) for i in range(0, len(fx), 250)]
        if name == "L2":
            lay = ff.ParamLayout.from_model(model)
            F = ff.Diagonal(torch.ones(lay.size), lay, num_samples=1.0)
        elif name == "EWC (Avalanche's rule)":
            F = avalanche_importance(model, data)
        else:
            structure = "kfac" if "K-FAC" in name else "diagonal"
            F = ff.estimate(model, data, "categorical", "mc", structure, seed=t, progress=False)
        F = (strength / F.num_samples) * F
        decay = 0.7 if name.startswith("online") else 1.0
        rule = "fused" if name.startswith("Fisher Flow") else "latest"
        if ewc is None:
            ewc = ff.apps.EWC(F, model, anchor_rule=rule)
        else:
            ewc.consolidate(F, model, decay=decay)
    return acc


def penalty_cost(batch: int, repeats: int) -> tuple[float, float]:
    """K-FAC EWC penalty+gradient time / one forward+backward (min, median ratio)."""
    model = make_model()
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    F = ff.estimate(model, [(x, y)], "categorical", "mc", "kfac", seed=0, progress=False)
    ewc = ff.apps.EWC(F, make_model(1))
    ratios = []
    for _ in range(repeats):  # interleaved
        t0 = time.perf_counter()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        model.zero_grad()
        ewc.penalty(model).backward()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return min(ratios), statistics.median(ratios)


METHODS = (
    "fine-tuning",
    "L2",
    "EWC diagonal",
    "EWC K-FAC",
    "online EWC diagonal (γ=0.7)",
    "Fisher Flow K-FAC (fused anchor)",
    "EWC (Avalanche's rule)",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples per task")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--only", default="", help="run only methods whose name starts so")
    parser.add_argument("--strengths", default="30,300", help="λ grid of the Fisher penalties")
    parser.add_argument("--l2-strengths", default="0.01,0.1", help="λ grid of the L2 penalty")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS_continual.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = load_mnist()
    n_train = 3000 if args.quick else 10000
    args.fisher_rows = 500 if args.quick else 1000
    x = torch.cat([xtr[:n_train], xte[:2000]])
    y = torch.cat([ytr[:n_train], yte[:2000]])
    tasks = permuted_tasks(x, y, args.tasks, n_train, seed=0)
    rows = []
    grid = [float(v) for v in args.strengths.split(",")]
    l2_grid = [float(v) for v in args.l2_strengths.split(",")]
    runs = [("fine-tuning", 0.0)] + [("L2", v) for v in l2_grid]
    runs += [(name, v) for name in METHODS[2:] for v in grid]
    if args.only:
        runs = [r for r in runs if r[0].startswith(args.only)]
    for name, strength in runs:
        t = time.perf_counter()
        acc = run_method(name, strength, tasks, args)
        final = acc[-1]
        forgetting = [
            max(acc[s][k] for s in range(k, len(acc))) - final[k] for k in range(len(acc) - 1)
        ]
        rows.append(
            (
                name,
                strength,
                sum(final) / len(final),
                sum(forgetting) / len(forgetting),
                final[0],
                time.perf_counter() - t,
            )
        )
        print(rows[-1], flush=True)
    cost = {b: penalty_cost(b, 20) for b in (128, 512, 2048)}
    lines = [
        "# Continual learning: permuted MNIST",
        "",
        f"Command: `python bench/bench_continual.py{' --quick' if args.quick else ''}` "
        f"({args.tasks} tasks, {n_train} training and 2000 test images per task, "
        f"{args.epochs} epoch(s) of Adam lr 1e-3 per task, MLP 784-256-256-10, λ = "
        f"{args.strengths} (Fisher penalties), {args.l2_strengths} (L2), MC Fisher (one "
        f"sampled label) on {args.fisher_rows} images per task). Shared 2-core "
        "CPU machine.",
        "",
        "| method | λ | final avg. accuracy | avg. forgetting | task-1 final accuracy | time (s) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {n} | {lam:g} | {a:.3f} | {f:.3f} | {t1:.3f} | {s:.0f} |"
            for n, lam, a, f, t1, s in rows
        ],
        "",
        "Avalanche 0.6 (`pip install --no-deps avalanche-lib`) does not import here "
        "(`avalanche.benchmarks` needs torchvision, which would replace torch); its EWC "
        "importance rule is reproduced in the last row.",
        "",
        "K-FAC EWC penalty + gradient, as a ratio to one forward+backward of the same MLP "
        "(20 interleaved repeats; target ≤ 0.2×):",
        "",
        "| batch | min ratio | median ratio |",
        "|---|---|---|",
        *[f"| {b} | {lo:.3f} | {med:.3f} |" for b, (lo, med) in cost.items()],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
