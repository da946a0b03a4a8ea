"""Where an optimizer step's time goes on the Shakespeare-char GPT of ``bench_optim.py``.

For every optimizer of :func:`bench_optim.optimizers` (but SGD and Muon), on the same
GPT, batches and single CPU thread, steps are interleaved as in ``bench_optim.py``;
the forward+backward and ``opt.step()`` are timed apart, the latter split into
refresh steps (curvature/basis/root refreshed: every 10th) and the others. Then one
refresh step and one other step of each optimizer run under ``cProfile``; the
functions with the most own time are listed.

Run: ``python bench/profile_optim.py [--steps 41] [--only K-FAC,SOAP]`` →
``bench/RESULTS_optim_profile.md``.

``--batches 8 16 32 64`` instead measures how the amortized step time / AdamW's depends
on the batch (:mod:`_batch_law`) → ``bench/RESULTS_optim_batch.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import _batch_law as batch_law
import bench_optim as B

OUT = Path(__file__).with_name("RESULTS_optim_profile.md")


def top(profile: cProfile.Profile, n: int = 4) -> str:
    """The ``n`` functions with the most own time, as ``name ms`` (``·``-separated)."""
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    out = []
    for (path, _line, func), (_, _, own, _, _) in rows[:n]:
        if path != "~":
            where = f"{Path(path).stem}.{func}"
        elif func.startswith("<method '"):
            where = func.split("'")[1]  # <method 'addmm_' of 'torch._C.TensorBase' objects>
        else:
            where = func.strip("<>").split(".")[-1]  # <built-in method torch._C...linalg_eigh>
        out.append(f"`{where}` {own * 1e3:.0f}")
    return " · ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (41, then 2 profiled; --batches: 31)"
    )
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None,
        help="batch sizes: time every optimizer on each (CPU clock) -> RESULTS_optim_batch.md",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="--batches: results file")
    args = parser.parse_args()
    if args.batches:
        batch_law.main(args.batches, args.steps, args.only, args.out)
        return
    args.steps = args.steps or 41
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, _, vocab = B.shakespeare()
    # refreshes fall on multiples of 10; the profiled refresh is the next one
    profiled = (args.steps + 9) // 10 * 10
    data = B.batches(train, profiled + 2, 8, 128, seed=1)
    table = B.optimizers()
    names = [n for n in table if n not in ("SGD+momentum", "Muon+AdamW")]
    if args.only:
        names = ["AdamW"] + [n for n in names if n in args.only.split(",") and n != "AdamW"]
    runs = B.fresh_runs({n: table[n] for n in names}, vocab)
    fb: dict[str, list[float]] = {n: [] for n in names}
    step: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    profiles: dict[str, dict[str, cProfile.Profile]] = {n: {} for n in names}
    start = time.perf_counter()
    for s, chunk in enumerate(data):
        for name in names:
            model, opt = runs[name]
            t0 = time.perf_counter()
            opt.zero_grad()
            B.loss_of(model, chunk).backward()
            t1 = time.perf_counter()
            kind = {profiled: "refresh", profiled + 1: "other"}.get(s)
            if kind is None:
                opt.step()
                fb[name].append(t1 - t0)
                step[name].append((s, time.perf_counter() - t1))
            else:
                prof = profiles[name][kind] = cProfile.Profile()
                prof.runcall(opt.step)
    write(names, fb, step, profiles, time.perf_counter() - start)


def write(names, fb, step, profiles, total) -> None:  # type: ignore[no-untyped-def]
    base = statistics.median(fb["AdamW"]) + statistics.median(t for _, t in step["AdamW"])
    lines = [
        f"# Where the step time goes: the Shakespeare-char GPT ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Command: `python bench/profile_optim.py {' '.join(sys.argv[1:])}`. The GPT, batches "
        "(8 × 128 characters) and hyperparameters of `bench/bench_optim.py`, one CPU thread, "
        f"torch {torch.__version__}, on a shared 2-core machine (other jobs running: "
        "absolute times are noisy, compare within a column). Medians over "
        f"{len(fb['AdamW'])} interleaved steps (the first, which builds state, excluded from "
        f"step medians). AdamW's whole step (forward+backward+step): {base * 1e3:.0f} ms. "
        f"Total {total:.0f} s.",
        "",
        "| optimizer | forward+backward ms | step() ms, other steps | step() ms, refresh "
        "steps | amortized step() / AdamW's whole step | refresh step, most own time "
        "(ms, cProfile) | other step, most own time (ms, cProfile) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        other = [t for s, t in step[name] if s % 10 and s > 0]
        refresh = [t for s, t in step[name] if s % 10 == 0 and s > 0] or [float("nan")]
        amortized = (9 * statistics.median(other) + statistics.median(refresh)) / 10
        lines.append(
            f"| {name} | {statistics.median(fb[name]) * 1e3:.0f} | "
            f"{statistics.median(other) * 1e3:.1f} | {statistics.median(refresh) * 1e3:.0f} | "
            f"{amortized / base:.2f} | {top(profiles[name]['refresh'])} | "
            f"{top(profiles[name]['other'])} |"
        )
    lines += [
        "",
        "Amortized step(): (9 × the other steps' median + the refresh steps' median) / 10, "
        "over AdamW's whole step; an optimizer's amortized step time / AdamW's is about "
        "1 + this − AdamW's own. Own time: inside the function itself (matrix products show "
        "as `matmul`, eigendecompositions as `linalg_eigh`, QR as `linalg_qr`).",
        "",
    ]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # the optimizers' one-time notices
    main()
