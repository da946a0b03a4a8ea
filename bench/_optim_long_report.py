"""Table and plot of ``bench_optim_long.py``'s stored runs (``--collect``).

Reads every ``<optimizer>_seed<seed>.json`` of the runs folder and writes
``RESULTS_optim_long.md`` (validation loss at fixed steps and at fixed CPU-time
budgets, the step at which each optimizer reaches AdamW's mean 1000-step validation
loss, step CPU time over AdamW's) and ``optim_long.png`` (mean curve and min–max band
over seeds, by step and by cumulative step CPU time).
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np

BASE = "AdamW"
#: Fractions of the run's length: the fixed steps (100, 250, 500, 1000 of 1000) ...
STEPS = (0.1, 0.25, 0.5, 1.0)
#: ... and AdamW's steps whose CPU time is a budget.
BUDGET_STEPS = (0.25, 0.5, 1.0)
ORDER = (
    "AdamW",
    "K-FAC",
    "K-FAC kl_clip=0.01",
    "K-FAC kl_clip=None",
    "SOAP",
    "SOAP lr=0.003",
    "Shampoo",
    "SOAP-kfac",
    "EKFAC",
    "SGD+momentum",
)

Runs = dict[str, dict[int, dict]]  # optimizer → seed → stored record


def load(folder: Path) -> Runs:
    """Every stored run of ``folder``, by optimizer then seed (the known optimizers first)."""
    runs: Runs = {}
    for path in sorted(folder.glob("*_seed*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        runs.setdefault(rec["optimizer"], {})[int(rec["seed"])] = rec
    rank = {n: i for i, n in enumerate(ORDER)}
    return dict(sorted(runs.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def cumulative(rec: dict) -> list[float]:
    """Cumulative step CPU time after each step (index k: after step k + 1)."""
    return list(itertools.accumulate(rec["step_cpu_s"]))


def loss_at_step(rec: dict, step: float) -> float | None:
    """Validation loss at ``step``, linear between the two validation points around it."""
    pts = rec["val_loss"]
    if step > pts[-1][0]:
        return None
    return float(np.interp(step, [s for s, _ in pts], [v for _, v in pts]))


def loss_at_budget(rec: dict, budget: float) -> tuple[float | None, int | None, bool]:
    """(loss, step, finished early) when the run's cumulative CPU time first reaches ``budget``.

    The step is the first whose cumulative time is ≥ the budget; the loss is interpolated
    between the validation points around it. A run that did all its steps in less
    time is given its final loss (``finished early``); an unfinished one ``None``.
    """
    cum = cumulative(rec)
    for k, t in enumerate(cum, 1):
        if t >= budget:
            return loss_at_step(rec, k), k, False
    if rec["done"] == rec["steps"] and not rec["failed"]:
        return rec["val_loss"][-1][1], len(cum), True
    return None, None, False


def reach_step(rec: dict, target: float) -> int | None:
    """First validation step (every ``--every`` steps) with loss ≤ ``target``, else ``None``."""
    return next((s for s, v in rec["val_loss"][1:] if v <= target), None)


def spread(values: list[float], digits: int = 3) -> str:
    """``mean ± std (min–max)`` over seeds (``mean`` alone for one seed, ``–`` for none)."""
    if not values:
        return "–"
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return (f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"({min(values):.{digits}f}–{max(values):.{digits}f})")  # fmt: skip


def length(runs: Runs) -> int:
    """The runs' planned number of steps (AdamW's)."""
    return int(next(iter(runs[BASE].values()))["steps"])


def at(fractions: tuple[float, ...], total: int) -> list[int]:
    return [round(f * total) for f in fractions]


def target_loss(runs: Runs) -> float | None:
    """AdamW's mean validation loss at its last step over its finished seeds."""
    finals = [loss_at_step(r, length(runs)) for r in runs.get(BASE, {}).values()]
    finals_ok = [v for v in finals if v is not None]
    return statistics.fmean(finals_ok) if finals_ok else None


def table_steps(runs: Runs) -> list[str]:
    steps = at(STEPS, length(runs))
    lines = [
        "| optimizer | setting | seeds | " + " | ".join(f"val loss @ {s}" for s in steps) + " |",
        "|---|---|---|" + "---|" * len(steps),
    ]
    for name, seeds in runs.items():
        cells = []
        for s in steps:
            vals = [v for r in seeds.values() if (v := loss_at_step(r, s)) is not None]
            cells.append(spread(vals) + (f" [{len(vals)} seeds]" if len(vals) < len(seeds) else ""))
        setting = next(iter(seeds.values()))["setting"]
        failed = [f"seed {k}: {r['failed']}" for k, r in seeds.items() if r["failed"]]
        failed += [
            f"seed {k}: stopped at step {r['val_loss'][-1][0]}"
            for k, r in seeds.items()
            if not r["failed"] and r["val_loss"][-1][0] < r["steps"]
        ]
        note = f" ({'; '.join(failed)})" if failed else ""
        lines.append(f"| {name}{note} | {setting} | {','.join(map(str, seeds))} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return lines


def table_budgets(runs: Runs) -> list[str]:
    base, steps = runs.get(BASE, {}), at(BUDGET_STEPS, length(runs))
    lines = [
        "| optimizer | "
        + " | ".join(f"val loss @ AdamW's CPU time for {s} steps (steps done)" for s in steps)
        + " |",
        "|---|" + "---|" * len(steps),
    ]
    for name, seeds in runs.items():
        cells = []
        for s in steps:
            vals, done, early = [], [], False
            for seed, rec in seeds.items():
                if seed not in base or len(base[seed]["step_cpu_s"]) < s:
                    continue
                loss, step, fin = loss_at_budget(rec, cumulative(base[seed])[s - 1])
                if loss is not None and step is not None:
                    vals.append(loss)
                    done.append(step)
                    early |= fin
            reached = f" ({statistics.fmean(done):.0f}{'†' if early else ''})" if done else ""
            cells.append(spread(vals) + reached)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def table_reach(runs: Runs, target: float) -> list[str]:
    seeds_all = sorted({k for seeds in runs.values() for k in seeds})
    total = length(runs)
    lines = [
        "| optimizer | " + " | ".join(f"seed {k}" for k in seeds_all)
        + f" | mean fraction of {total} | ≤ 0.8× |",
        "|---|" + "---|" * (len(seeds_all) + 2),
    ]  # fmt: skip
    for name, seeds in runs.items():
        cells, fracs = [], []
        for k in seeds_all:
            rec = seeds.get(k)
            if rec is None:
                cells.append("–")
                continue
            step = reach_step(rec, target)
            if step is None:
                cells.append(f"not reached by {rec['val_loss'][-1][0]}")
            else:
                fracs.append(step / total)
                cells.append(f"{step} ({step / total:.2f}×)")
        if fracs and len(fracs) == len(seeds):
            mean = statistics.fmean(fracs)
            verdict = "yes" if mean <= 0.8 else "no"
            mean_cell = f"{mean:.2f}×"
        else:
            verdict = "no"
            mean_cell = f"not reached ({len(fracs)} of {len(seeds)} seeds reached it)"
        verdict = "(baseline)" if name == BASE else verdict
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_cell} | {verdict} |")
    return lines


def table_time(runs: Runs) -> list[str]:
    base = runs.get(BASE, {})
    lines = [
        "| optimizer | CPU s per step (mean over seeds) | amortized step CPU time / AdamW | "
        "same process as AdamW |",
        "|---|---|---|---|",
    ]
    for name, seeds in runs.items():
        per_step = [statistics.fmean(r["step_cpu_s"]) for r in seeds.values() if r["step_cpu_s"]]
        ratios, together = [], True
        for seed, rec in seeds.items():
            if seed in base and rec["step_cpu_s"]:
                n = min(len(rec["step_cpu_s"]), len(base[seed]["step_cpu_s"]))
                ratios.append(sum(rec["step_cpu_s"][:n]) / sum(base[seed]["step_cpu_s"][:n]))
                together &= BASE in rec["together_with"]
        lines.append(f"| {name} | {spread(per_step)} | {spread(ratios, 2)} | "
                     f"{'yes' if together else 'no'} |")  # fmt: skip
    return lines


def ranking(runs: Runs, step: int) -> str:
    """Optimizers ordered by mean validation loss at ``step`` (those with every seed there)."""
    means = {}
    for name, seeds in runs.items():
        vals = [loss_at_step(r, step) for r in seeds.values()]
        if vals and all(v is not None for v in vals):
            means[name] = statistics.fmean(v for v in vals if v is not None)
    return " < ".join(f"{n} {v:.3f}" for n, v in sorted(means.items(), key=lambda kv: kv[1]))


def plot(runs: Runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    low = np.inf
    for i, (name, seeds) in enumerate(runs.items()):
        color = f"C{i % 10}"
        recs = list(seeds.values())
        last = min(r["val_loss"][-1][0] for r in recs)
        steps = [s for s, _ in recs[0]["val_loss"] if 0 < s <= last]
        vals = np.array([[loss_at_step(r, s) for s in steps] for r in recs], dtype=float)
        low = min(low, float(vals.min()))
        style = "-" if i < 10 else "--"
        by_step.plot(steps, vals.mean(0), style, color=color, label=f"{name} ({len(recs)} seeds)")
        by_step.fill_between(steps, vals.min(0), vals.max(0), color=color, alpha=0.2)
        curves = []
        for r in recs:
            cum = [0.0, *cumulative(r)]
            curves.append(([cum[s] for s, _ in r["val_loss"]], [v for _, v in r["val_loss"]]))
        grid = np.linspace(min(t[1] for t, _ in curves), min(t[-1] for t, _ in curves), 100)
        on_grid = np.array([np.interp(grid, t, v) for t, v in curves])
        by_time.plot(grid, on_grid.mean(0), style, color=color, label=name)
        by_time.fill_between(grid, on_grid.min(0), on_grid.max(0), color=color, alpha=0.2)
    by_step.set_xlabel("step")
    by_time.set_xlabel("cumulative step CPU time (s, one thread)")
    by_step.set_ylabel("validation loss (nats/char)")
    by_step.set_ylim(low - 0.05, 3.0)  # a run that blew up stays off the chart
    by_step.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def collect(folder: Path, out: Path) -> None:
    """Write ``out`` (Markdown tables) and ``optim_long.png`` beside it from ``folder``'s runs."""
    runs = load(folder)
    if BASE not in runs:
        raise SystemExit(f"no {BASE} run in {folder}: nothing to compare against")
    target, total = target_loss(runs), length(runs)
    any_rec = next(iter(runs[BASE].values()))
    every = any_rec["val_loss"][1][0] if len(any_rec["val_loss"]) > 1 else "–"
    png = out.with_name("optim_long.png")
    plot(runs, png)
    commands = sorted({r["command"] for seeds in runs.values() for r in seeds.values()})
    lines = [
        f"# Long multi-seed runs: optimizers on a Shakespeare-char GPT "
        f"({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"{any_rec['steps']} steps, batch {any_rec['batch']} × {any_rec['context']} characters; "
        f"validation on {any_rec['held_out']} (the same for every seed). "
        f"CPU, torch {any_rec['torch']}, {any_rec['threads']} thread; step times are the CPU "
        "time of zero_grad + forward + backward + step (`time.thread_time`), measured on a "
        "shared 2-core machine while other jobs ran: CPU time, unlike wall time, barely "
        "depends on that load, but cache and memory contention still move it by some percent.",
        "",
        "Commands (each seed its own process; then `python bench/bench_optim_long.py --collect`):",
        "",
        *[f"    {c}" for c in commands],
        "",
        "Hyperparameters: AdamW, K-FAC, EKFAC and SOAP use the setting with the lowest "
        "100-step validation loss of `bench/RESULTS_optim_sweep.md` (seed 0); the others "
        "`bench_optim.py`'s single setting (not swept).",
        "",
        "## Validation loss at fixed steps (mean ± std over seeds, min–max)",
        "",
        *table_steps(runs),
        "",
        f"Ranking at step {total} (mean): {ranking(runs, total) or '–'}.",
        "",
        "## Validation loss at fixed CPU-time budgets",
        "",
        "Budget: the cumulative step CPU time AdamW of the same seed took for "
        f"{', '.join(map(str, at(BUDGET_STEPS, total)))} steps; the loss each optimizer "
        "had when its own cumulative step time first reached it (linear between the "
        "validation points around that step); in brackets the mean step reached (†: a "
        f"run that finished its {total} steps within the budget counts with its final loss).",
        "",
        *table_budgets(runs),
        "",
        f"## Steps to AdamW's {total}-step validation loss",
        "",
        (
            f"Target: AdamW's mean validation loss at step {total}, {target:.4f}. First "
            f"validation point (every {every} steps) at or below it, as a fraction of {total} "
            "steps; the issue's target is ≤ 0.8×."
            if target is not None
            else "AdamW has no finished run yet: no target."
        ),
        "",
        *(table_reach(runs, target) if target is not None else []),
        "",
        "## Step CPU time",
        "",
        "Amortized: a run's total step CPU time over AdamW's (same seed, same number of "
        "steps; curvature/basis refreshes every 10 steps included); runs not in AdamW's "
        "process are compared across processes.",
        "",
        *table_time(runs),
        "",
        f"![validation loss by step and by CPU time]({png.name})",
        "",
    ]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
