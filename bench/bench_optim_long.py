"""Long multi-seed runs of the Shakespeare-char GPT optimizers: fixed steps and fixed CPU time.

The model, data, batches and optimizer tables are ``bench_optim.py``'s (4-layer GPT,
d = 128, 4 heads, context 128). One process per seed: its optimizers start from that
seed's initial weights, see that seed's batches (batch 8 × 128 characters) and are
stepped in turn (interleaved); each step's CPU time (``zero_grad`` + forward +
backward + ``step``) is measured with ``time.thread_time`` on one torch thread — the
CPU the step used, not the wall clock, so the load of other processes on the shared
machine barely moves it. The validation loss (mean cross-entropy, nats/char) is taken
every ``--every`` steps on a held-out set that is the same for every seed (4 × 16
windows of the held-out plays). Each (optimizer, seed) run is stored, and rewritten
after every validation point, as ``bench/optim_long/<optimizer>_seed<seed>.json``;
``--collect`` turns every stored run into ``bench/RESULTS_optim_long.md`` and
``bench/optim_long.png`` without re-running.

Hyperparameters: AdamW, K-FAC, EKFAC and SOAP take the best setting of the 100-step
sweep (``bench/RESULTS_optim_sweep.md``, :data:`FROM_SWEEP`); the others (Shampoo,
SOAP-kfac, SGD+momentum, Muon+AdamW, heavyball SOAP) ``bench_optim.optimizers``'
single setting, not swept; "SOAP lr=0.003" is SOAP at that table's setting, and
"K-FAC kl_clip=0.01" / "K-FAC kl_clip=None" K-FAC's sweep pick with a looser or no
trust region.

Run (each seed in its own process, in the background if you like)::

    python bench/bench_optim_long.py --seed 0 --only AdamW,K-FAC,SOAP
    python bench/bench_optim_long.py --collect
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fisherflow as ff
from _steps import timed_round
from bench_optim import (
    batches,
    evaluate,
    fresh_runs,
    loss_of,
    optimizers,
    shakespeare,
    sweep,
)

DIR = Path(__file__).with_name("optim_long")

#: Long-run name → the ``bench_optim.sweep`` setting with the lowest 100-step
#: validation loss (bench/RESULTS_optim_sweep.md, seed 0).
FROM_SWEEP = {
    "AdamW": "AdamW lr=0.003",
    "K-FAC": "K-FAC lr=0.1 λ=0.01",
    "EKFAC": "EKFAC lr=0.1 λ=0.01",
    "SOAP": "SOAP lr=0.01",
    "Muon+AdamW": "Muon+AdamW lr=0.01",
}
#: Seed of the held-out windows: one validation set for every training seed.
HELD_SEED = 12345


def table(seed: int) -> dict[str, tuple[str, Callable[[nn.Module], object]]]:
    """Long-run name → (the setting it stands for, factory), MC samplers seeded ``seed``."""
    swept, fixed = sweep(seed), optimizers(seed)
    out = {name: (f"{key} (sweep best)", swept[key]) for name, key in FROM_SWEEP.items()}
    for name, factory in fixed.items():
        if name not in out and "power" not in name:
            out[name] = ("bench_optim default, not swept", factory)
    # SOAP at bench_optim's default lr too: the sweep's pick was at the top of its grid.
    out["SOAP lr=0.003"] = ("bench_optim default (SOAP lr=0.003)", fixed["SOAP"])
    # K-FAC's sweep pick with a looser or no trust region (does kl_clip hold it back?).
    for clip in (1e-2, None):
        out[f"K-FAC kl_clip={clip}"] = (
            f"K-FAC lr=0.1 λ=0.01, kl_clip={clip}",
            lambda m, clip=clip: ff.optim.KFAC(
                m, lr=0.1, damping=1e-2, momentum=0.9, update_freq=10, kl_clip=clip, seed=seed
            ),
        )
    return out


def store(path: Path, record: dict[str, object]) -> None:
    """Write ``record`` as JSON atomically (temporary file in the folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_path(folder: Path, name: str, seed: int) -> Path:
    return folder / f"{name.replace(' ', '_').replace('+', 'plus')}_seed{seed}.json"


def run(args: argparse.Namespace) -> None:
    """Train the ``--only`` optimizers ``--steps`` steps on seed ``--seed``, storing as it goes."""
    torch.set_num_threads(1)
    options = table(args.seed)
    names = args.only.split(",") if args.only else ["AdamW", "K-FAC", "SOAP"]
    unknown = [n for n in names if n not in options]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; valid: {sorted(options)}")
    train, val, vocab = shakespeare()
    data = batches(train, args.steps, args.batch, 128, seed=args.seed + 1)
    held = batches(val, args.held[0], args.held[1], 128, seed=HELD_SEED)
    torch.manual_seed(args.seed)
    runs = fresh_runs({n: options[n][1] for n in names}, vocab)
    times: dict[str, list[float]] = {n: [] for n in names}
    curves = {n: [(0, evaluate(runs[n][0], held))] for n in names}
    failed: dict[str, str] = {}
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def save(step: int) -> None:
        for name in names:
            store(run_path(args.dir, name, args.seed), {
                "optimizer": name, "setting": options[name][0], "seed": args.seed,
                "steps": args.steps, "done": step, "batch": args.batch, "context": 128,
                "held_out": f"{args.held[0]} x {args.held[1]} windows, seed {HELD_SEED}",
                "together_with": names, "failed": failed.get(name),
                "step_cpu_s": times[name], "val_loss": curves[name],
                "process_cpu_s": time.process_time() - cpu0,
                "wall_s": time.perf_counter() - wall0, "started": started,
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "command": "python bench/bench_optim_long.py " + " ".join(sys.argv[1:]),
            })  # fmt: skip

    for s, chunk in enumerate(data, 1):
        timed_round(
            {n: runs[n] for n in names}, lambda m, c=chunk: loss_of(m, c), times, failed, s,
            clock=time.thread_time,
        )  # fmt: skip
        if s % args.every == 0 or s == args.steps:
            for name in names:
                if name not in failed:
                    curves[name].append((s, evaluate(runs[name][0], held)))
            save(s)
            print(f"seed {args.seed} step {s}/{args.steps} "
                  f"({time.perf_counter() - wall0:.0f} s wall): "
                  + ", ".join(f"{n} {curves[n][-1][1]:.3f}" for n in names if n not in failed)
                  + "".join(f"; {n} {failed[n]}" for n in failed), flush=True)  # fmt: skip
    save(args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="comma-separated (default AdamW,K-FAC,SOAP)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--every", type=int, default=50, help="steps between validations")
    parser.add_argument("--held", type=int, nargs=2, default=(4, 16), help="held-out batches, size")
    parser.add_argument("--dir", type=Path, default=DIR, help="where the per-run JSON live")
    parser.add_argument("--collect", action="store_true", help="table + plot from stored runs")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("RESULTS_optim_long.md")
    )
    args = parser.parse_args()
    if args.collect:
        from _optim_long_report import collect

        collect(args.dir, args.out)
    else:
        run(args)


if __name__ == "__main__":
    warnings.simplefilter("default")
    main()
