"""``ff.Laplace`` against laplace-torch 0.3: fit + predict time and agreement on an MLP.

Same model (an MLP 32-128-128-10, bias-free so that the two K-FACs are the same
matrix; see ``tests/uncertainty/test_laplace_torch.py``), same data, same prior:
each repetition fits both (K-FAC, and diagonal, exact GGN) and predicts GLM probit
probabilities, interleaved; the table gives the time ratio laplace-torch / fisherflow
(min and median over repetitions) and the largest probability difference. Writes
``bench/RESULTS_laplace.md``.

Run: ``python bench/bench_laplace.py [--quick]`` (needs ``laplace-torch==0.3``, installed
``--no-deps`` by ``make bench-deps``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _laplace_peer import laplace_cell, speedups

STRUCTURES = {"kron": "kfac", "diag": "diagonal"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="less data, fewer repetitions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, reps = (1024, 2) if args.quick else (4096, 3)
    model = nn.Sequential(
        nn.Linear(32, 128, bias=False),
        nn.Tanh(),
        nn.Linear(128, 128, bias=False),
        nn.Tanh(),
        nn.Linear(128, 10, bias=False),
    )
    X = torch.randn(n, 32)
    y = torch.randint(0, 10, (n,))
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    x_test = torch.randn(128, 32)
    rows = []
    for theirs, ours in STRUCTURES.items():
        ff_times, lt_times, diff = laplace_cell(
            model, loader, x_test, theirs=theirs, ours=ours, reps=reps
        )
        t_ff, t_lt, low, mid = speedups(ff_times, lt_times)
        rows.append(
            f"| {ours} | {t_ff:.2f} s | {t_lt:.2f} s | {low:.2f}× | {mid:.2f}× | {diff:.1e} |"
        )
    lines = [
        "# Laplace: fisherflow against laplace-torch 0.3 (CPU, float32)",
        "",
        f"Command: `python bench/bench_laplace.py{' --quick' if args.quick else ''}"
        f"{f' --threads {args.threads}' if args.threads != 2 else ''}` — "
        f"{args.threads} thread(s), MLP 32-128-128-10 (bias-free), {n} training rows in "
        f"batches of 256, GLM probit predictive on 128 rows, all weights, {reps} "
        "interleaved repetitions, on a shared 2-core machine (noisy timings).",
        "",
        "| structure | fisherflow fit+predict | laplace-torch fit+predict | speed-up (min) "
        "| (median) | max prob. difference |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    out = Path(__file__).with_name("RESULTS_laplace.md")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
