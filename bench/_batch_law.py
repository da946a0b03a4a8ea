"""How the optimizers' amortized step time / AdamW's depends on the batch, and why.

``python bench/profile_optim.py --batches 8 16 32 64 [--steps 31] [--only K-FAC,SOAP]
[--out FILE]`` → ``bench/RESULTS_optim_batch.md``. For each batch size (× 128 characters), every
optimizer of :data:`NAMES` starts from the same GPT weights (``bench_optim.py``'s) and
sees the same batches, interleaved (one step of each in turn), on one thread; the
forward+backward and ``opt.step()`` are timed apart with the process's CPU clock
(``time.process_time``: the machine is shared, and other processes' load does not
count, though their cache and memory-bandwidth pressure still does). The first step
(state built) is left out, so 30 steps hold 3 refreshes at update frequency 10.

The overhead law. An optimizer's extra time per step is a part that does not grow
with the batch — the per-step preconditioning, four matrix products per layer,
∝ Σ n_in·n_out·(n_in + n_out), plus an amortized share of the refresh's
eigendecompositions/QR, ∝ Σ n³ — and a part that does (K-FAC/EKFAC/SOAP-kfac: the
refresh's capture forward+backward and factor Gram products, ∝ tokens); AdamW's whole
step is ∝ tokens · parameters. So ``ratio(T) = 1 + (a + b·T)/(c + d·T)`` over
``T`` tokens: the fixed part fades as ``1/T`` and the ratio tends to ``1 + b/d``.
:func:`write` fits ``a, b`` (per optimizer) and ``c, d`` (AdamW) by least squares over
the batches and reports the asymptote and the batch from which the fit is ≤ 1.25×.
"""

from __future__ import annotations

import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bench_optim as B
import fisherflow as ff

OUT = Path(__file__).with_name("RESULTS_optim_batch.md")
CTX = 128
#: The optimizers timed (those present: heavyball's need ``heavyball``).
NAMES = (
    "AdamW", "K-FAC", "EKFAC", "Shampoo", "SOAP", "SOAP-kfac", "heavyball SOAP",
    "heavyball KL-Shampoo",
)  # fmt: skip
TARGET = 1.25
#: ``curvature_rows`` of the "… rows=8" variants: the capture of a batch of 8 sequences.
ROWS = 8
#: bench_optim.py's K-FAC/EKFAC settings (its ``optimizers()``), for the variants.
KFAC = {"lr": 0.3, "damping": 1e-3, "momentum": 0.9, "update_freq": 10, "kl_clip": 1e-3}


def heavyball_kl_shampoo(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """heavyball's Shampoo (3.2 ships it as KL-Shampoo, Lin et al. 2025), no compile."""
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None  # no torch.compile: no compiler on the bench machine
    heavyball.utils.compile_mode_recommended_to_none = None
    return heavyball.KLShampoo(  # type: ignore[no-any-return]
        model.parameters(), lr=lr, precondition_frequency=10, compile_step=False,
        weight_decay=0.0,
    )  # fmt: skip


def table() -> dict[str, object]:
    """``{name: factory}``: :data:`NAMES` (bench_optim's, heavyball's Shampoo), then
    K-FAC, EKFAC and SOAP-kfac with ``curvature_rows=ROWS``."""
    out = dict(B.optimizers())
    if "heavyball SOAP" in out:
        out["heavyball KL-Shampoo"] = lambda m: heavyball_kl_shampoo(m, 3e-3)
    table = {n: out[n] for n in NAMES if n in out}
    table[f"K-FAC rows={ROWS}"] = lambda m: ff.optim.KFAC(m, curvature_rows=ROWS, **KFAC)
    table[f"EKFAC rows={ROWS}"] = lambda m: ff.optim.EKFAC(m, curvature_rows=ROWS, **KFAC)
    table[f"SOAP-kfac rows={ROWS}"] = lambda m: ff.optim.SOAP(
        m.parameters(), lr=3e-3, weight_decay=0.0, model=m, basis="kfac", curvature_rows=ROWS
    )
    return table


def kron_work(model: nn.Module) -> int:
    """Σ n_in·n_out·(n_in + n_out) over the 2-D weights: a step's rotation MACs / 2.

    An embedding ``(num, d)`` counts its ``d`` side only (its one-hot input factor is
    diagonal): ``num·d²``.
    """
    total = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.dim() != 2:
                continue
            rows, cols = p.shape
            total += (
                rows * cols * cols
                if isinstance(module, nn.Embedding)
                else rows * cols * (rows + cols)
            )
    return total


def time_batch(size: int, steps: int, names: list[str], vocab: int, train: torch.Tensor):  # type: ignore[no-untyped-def]
    """``{name: (forward+backward s per step, step() s per step)}`` (step 0 included),
    or the error of a run that failed."""
    factories = table()
    runs = B.fresh_runs({n: factories[n] for n in names}, vocab)
    data = B.batches(train, steps, size, CTX, seed=1)
    out: dict[str, tuple[list[float], list[float]] | str] = {n: ([], []) for n in names}
    for chunk in data:
        for name in names:
            model, opt = runs[name]
            times = out[name]
            if isinstance(times, str):
                continue
            try:
                t0 = time.process_time()
                opt.zero_grad()  # type: ignore[attr-defined]
                B.loss_of(model, chunk).backward()
                t1 = time.process_time()
                opt.step()  # type: ignore[attr-defined]
            except Exception as err:  # a failing run is a result to report
                out[name] = f"{type(err).__name__}: {str(err)[:100]}"
                continue
            times[0].append(t1 - t0)
            times[1].append(time.process_time() - t1)
    return out


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y ≈ a + b·x``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def main(batches: list[int], steps: int | None, only: str | None, out: str | None) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    steps = steps or 31
    train, _, vocab = B.shakespeare()
    names = [n for n in table() if not only or n == "AdamW" or n in only.split(",")]
    start = time.perf_counter()
    results = {}
    for size in batches:
        results[size] = time_batch(size, steps, names, vocab, train)
        print(f"batch {size} done ({time.perf_counter() - start:.0f} s)", flush=True)
        write(list(results), steps, names, results, kron_work(B.GPT(vocab)), vocab,
              time.perf_counter() - start, Path(out) if out else OUT)  # fmt: skip


def write(batches, steps, names, results, work, vocab, total, path) -> None:  # type: ignore[no-untyped-def]
    params = sum(p.numel() for p in B.GPT(vocab).parameters())

    def whole(name: str, size: int) -> list[float]:
        fb, st = results[size][name]
        return [a + b for a, b in zip(fb[1:], st[1:], strict=True)]

    def amortized(name: str, size: int) -> float:
        return sum(whole(name, size)) / sum(whole("AdamW", size))

    head = " | ".join(f"batch {b} ({b * CTX} tokens)" for b in batches)
    lines = [
        f"# Amortized step time against the batch: the Shakespeare-char GPT "
        f"({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Command: `python bench/profile_optim.py {shlex.join(sys.argv[1:])}`. The GPT and "
        f"hyperparameters of `bench/bench_optim.py` ({params:,} parameters), batch × {CTX} "
        f"characters, {steps} interleaved steps per batch size (the first, which builds "
        f"state, left out: {steps - 1} steps, {(steps - 1) // 10} refreshes at update "
        f"frequency 10), one thread, CPU clock (`time.process_time`), torch "
        f"{torch.__version__}, on a shared 2-core machine (other engineers' jobs running). "
        f"Total {total:.0f} s.",
        "",
        "## Amortized step time / AdamW's (forward+backward+step, summed over the steps)",
        "",
        f"| optimizer | {head} | fitted limit (large batch) | fit ≤ {TARGET}× from batch |",
        "|---|" + "---|" * (len(batches) + 2),
    ]
    tokens = [b * CTX for b in batches]
    adamw = [statistics.fmean(whole("AdamW", b)) for b in batches]
    c, d = fit(tokens, adamw)
    failures = []
    for name in names:
        ok = [b for b in batches if not isinstance(results[b][name], str)]
        failures += [f"{name} at batch {b}: {results[b][name]}" for b in batches if b not in ok]
        cells = [f"{amortized(name, b):.2f}×" if b in ok else "failed" for b in batches]
        over = [statistics.fmean(whole(name, b)) - adamw[batches.index(b)] for b in ok]
        if name == "AdamW" or d <= 0 or len(ok) < 2:  # fewer than two batch sizes: no fit
            limit, reach = ("1.00×" if name == "AdamW" else "–"), "–"
        else:
            a, slope = fit([b * CTX for b in ok], over)
            limit = f"{1 + slope / d:.2f}×"
            if (TARGET - 1) * d > slope:
                t = (a - (TARGET - 1) * c) / ((TARGET - 1) * d - slope)
                reach = f"{t / CTX:.0f}" if t > 0 else "any"
            else:
                reach = "never"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {limit} | {reach} |")
    if failures:
        lines += ["", "Failed: " + "; ".join(failures) + "."]
    lines += [
        "",
        "## Where it goes: CPU ms per step (medians)",
        "",
        "| optimizer | "
        + " | ".join(f"batch {b}: fwd+bwd · step() other · step() refresh" for b in batches)
        + " |",
        "|---|" + "---|" * len(batches),
    ]
    for name in names:
        cells = []
        for b in batches:
            if isinstance(results[b][name], str):
                cells.append("failed")
                continue
            fb, st = results[b][name]
            other = [t for s, t in enumerate(st) if s % 10 and s > 0]
            refresh = [t for s, t in enumerate(st) if s % 10 == 0 and s > 0] or [float("nan")]
            cells.append(
                f"{statistics.median(fb[1:]) * 1e3:.0f} · {statistics.median(other) * 1e3:.1f}"
                f" · {statistics.median(refresh) * 1e3:.0f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fb_ms = [statistics.median(results[b]["AdamW"][0][1:]) * 1e3 for b in batches]
    kfac_other = [
        statistics.median(t for s, t in enumerate(results[b]["K-FAC"][1]) if s % 10 and s > 0) * 1e3
        for b in batches
        if "K-FAC" in names and not isinstance(results[b]["K-FAC"], str)
    ]
    lines += [
        "",
        "## The overhead law",
        "",
        f"AdamW's whole step fits {c * 1e3:.0f} ms + {d * 1e6:.1f} µs per token: it grows "
        f"with tokens × parameters (6 × {params:,} ≈ {6 * params / 1e6:.1f} MFLOP per token "
        f"for the matrix products, plus attention ∝ tokens × context); its forward+backward "
        f"took "
        + ", ".join(f"{m:.0f}" for m in fb_ms)
        + " ms at batch "
        + ", ".join(str(b) for b in batches)
        + ".",
    ]
    if kfac_other:
        flops = 4 * work  # rotate + rotate back: 2·work multiply-adds
        lines.append(
            f"K-FAC's step() between refreshes (the four rotations per layer, "
            f"Σ n_in·n_out·(n_in + n_out) = {work / 1e6:.0f} M, i.e. {flops / 1e9:.2f} GFLOP "
            f"a step) took " + ", ".join(f"{m:.0f}" for m in kfac_other) + " ms at the same "
            f"batches ({flops / 1e9 / (statistics.median(kfac_other) / 1e3):.0f} GFLOP/s): "
            "it does not grow with the batch."
        )
    lines += [
        "",
        "Fitted limit: `1 + b/d` of `ratio(T) = 1 + (a + b·T)/(c + d·T)` (least squares of the "
        "mean per-step overhead and of AdamW's mean whole step over the tokens `T`); "
        f"'fit ≤ {TARGET}× from batch': where that fit crosses {TARGET}× (an extrapolation "
        "beyond the largest batch measured; 'never': the per-token overhead alone exceeds "
        f"{TARGET - 1:.2f}× AdamW's).",
        "",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
