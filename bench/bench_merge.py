"""Merging two fine-tunes of one model, and the merge command's memory.

Part 1 — MNIST: an MLP 784-256-256-10 trained briefly on all classes (the common
initialisation), then fine-tuned with Adam on classes 0-4 and, separately, on 5-9.
Merges, evaluated on the full test set (all ten classes): plain averaging, task
arithmetic (θ₀ + α Σ (θᵢ − θ₀), α chosen on a validation split), Fisher merging with
a diagonal and a K-FAC Fisher (exact kind, ``ff.apps.merge``), and with the diagonal
Fisher read off each fine-tune's Adam state (``ff.fisher_from_optimizer``: no extra
pass over data).

Part 2 — ``fisherflow merge`` on two sharded GPT-2-style checkpoints (random
weights; Fishers are random diagonals or K-FAC estimated on a few tokens, since
memory does not depend on their values): peak resident memory of the merge in a
fresh process, above the process's memory before the merge, against the tensor set
any streaming merge must hold at once: the output shard being filled plus, for
the largest merge unit, each input's parameters and its Fisher over them.

The character-GPT merge (Shakespeare and King James Bible) is ``bench_merge_gpt.py``.

Run: ``python bench/bench_merge.py`` (``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import fisherflow as ff
from _mnist import load_mnist
from bench_continual import make_model
from fisherflow.cli.demo_data import train
from fisherflow.cli.demo_ewc_merge import accuracy


def fine_tune(base, x, y, epochs, seed):
    model = copy.deepcopy(base)
    return model, train(model, x, y, epochs=epochs, lr=1e-3, batch=128, seed=seed)


def load(base, state):
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model


def part_mnist(args):
    xtr, ytr, xte, yte = load_mnist()
    n = 12000 if args.quick else 30000
    xv, yv = xtr[50000:52000], ytr[50000:52000]  # validation (for task arithmetic's α)
    base = make_model()
    train(base, xtr[:1000], ytr[:1000], epochs=3, lr=1e-3, batch=128)
    models, opts, halves = [], [], []
    for lo in (0, 5):
        keep = (ytr[:n] >= lo) & (ytr[:n] < lo + 5)
        x, y = xtr[:n][keep], ytr[:n][keep]
        m, o = fine_tune(base, x, y, args.epochs, seed=lo)
        models.append(m)
        opts.append(o)
        halves.append((x, y))
    rows = [("common initialisation", accuracy(base, xte, yte), 0.0)]
    rows += [
        (f"fine-tuned on {lo}-{lo + 4}", accuracy(m, xte, yte), 0.0)
        for lo, m in zip((0, 5), models, strict=True)
    ]
    t = time.perf_counter()
    states = [m.state_dict() for m in models]
    avg = {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}
    rows.append(("plain average", accuracy(load(base, avg), xte, yte), time.perf_counter() - t))
    t = time.perf_counter()
    b0 = base.state_dict()
    best = None
    for alpha in (0.3, 0.5, 0.7, 0.9, 1.0, 1.2):
        st = {k: b0[k] + alpha * ((states[0][k] - b0[k]) + (states[1][k] - b0[k])) for k in b0}
        acc_v = accuracy(load(base, st), xv, yv)
        if best is None or acc_v > best[0]:
            best = (acc_v, alpha, st)
    assert best is not None
    rows.append(
        (
            f"task arithmetic (α = {best[1]:g})",
            accuracy(load(base, best[2]), xte, yte),
            time.perf_counter() - t,
        )
    )
    kfac = []
    for structure in ("diagonal", "kfac"):
        t = time.perf_counter()
        Fs = []
        for m, (x, y) in zip(models, halves, strict=True):
            rows_f = x[: args.fisher_rows], y[: args.fisher_rows]
            data = [
                (rows_f[0][i : i + 250], rows_f[1][i : i + 250])
                for i in range(0, len(rows_f[0]), 250)
            ]
            Fs.append(ff.estimate(m, data, "categorical", "exact", structure, progress=False))
        merged = ff.apps.merge(models, Fs, damping=1e-3)
        name = "K-FAC" if structure == "kfac" else structure
        rows.append(
            (
                f"Fisher merge, {name}",
                accuracy(load(base, merged), xte, yte),
                time.perf_counter() - t,
            )
        )
        if structure == "kfac":
            kfac = Fs
            t = time.perf_counter()
            merged = ff.apps.merge(models, Fs, damping=0.0)
            rows.append(
                (
                    "Fisher merge, K-FAC, damping 0 (direct two-model solve; time excl. Fisher)",
                    accuracy(load(base, merged), xte, yte),
                    time.perf_counter() - t,
                )
            )
    t = time.perf_counter()
    Fs = [
        ff.fisher_from_optimizer(o, batch_size=128, num_samples=len(h[1]), model=m)
        for o, h, m in zip(opts, halves, models, strict=True)
    ]
    merged = ff.apps.merge(models, Fs, damping=1e-3)
    rows.append(
        (
            "Fisher merge, from Adam's state",
            accuracy(load(base, merged), xte, yte),
            time.perf_counter() - t,
        )
    )
    base_data = [(xtr[i : i + 250], ytr[i : i + 250]) for i in range(0, 1000, 250)]
    base_fisher = ff.estimate(base, base_data, "categorical", "exact", "kfac", progress=False)
    solver = part_solver(args, [*models, base], [*kfac, base_fisher])
    return rows, n, solver


def part_solver(args, models, fishers):
    """Conjugate-gradient steps and time of the K-FAC merge solve, per layer.

    Preconditioners ``"pair"`` (the two-term solve by simultaneous diagonalisation,
    now the default) and ``"sum"`` (the factor-wise K-FAC sum, as before), interleaved
    on the same right-hand sides: the two fine-tunes (2 models) and the two fine-tunes
    with the common initialisation (3 models).
    """
    from fisherflow.apps._kron_solve import psd_factors
    from fisherflow.apps._solve import weighted_solve
    from fisherflow.apps.merging import merge_units, unit_fisher

    out = []
    cases = [("2 models", 2, 0.0), ("2 models", 2, 1e-3), ("3 models", 3, 1e-3)]
    for label, m, lam in cases:
        Fs = fishers[:m]  # float32, as estimated (weighted_solve works in float64)
        named = [
            {k: v.detach().double() for k, v in mod.state_dict().items()} for mod in models[:m]
        ]
        for unit, names in merge_units(Fs[0]).items():
            if unit not in Fs[0].groups():
                continue
            sub = [unit_fisher(F, unit, names) for F in Fs]
            # residuals against what is solved: float64, factors projected onto PSD
            s64 = [psd_factors(F.to(dtype=torch.float64)) for F in sub]
            lay = sub[0].layout
            flats = [lay.flatten({k: t[k] for k in names}) for t in named]
            avg = sum(flats) / m
            rhs = sum(F.mv(th - avg) for F, th in zip(s64, flats, strict=True))
            cell = {}
            for name in ("pair", "sum"):
                cap = args.sum_max_iter if name == "sum" else 1000
                info = {}
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x = weighted_solve(
                        sub, [1.0] * m, rhs, lam, info=info, preconditioner=name, max_iter=cap
                    )
                secs = time.perf_counter() - t
                res = sum(F.mv(x) for F in s64) + lam * x - rhs
                cell[name] = (
                    info["iterations"],
                    secs,
                    float(res.norm() / rhs.norm()),
                    float(x.norm()),
                )
            out.append((label, lam, unit, tuple(sub[0].dims[unit]), cell))
            print(out[-1], flush=True)
    return out


_CHILD = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import fisherflow as ff
    from fisherflow.cli import merge_stream

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def rss():  # current (total, anonymous) resident set size, bytes
        with open("/proc/self/status") as f:
            kb = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith("Rss")}
        return kb["RssAnon"] * 1024, (kb["RssAnon"] + kb["RssFile"] + kb["RssShmem"]) * 1024

    cfg, out = sys.argv[1], sys.argv[2]
    before, peak, done = rss(), [0, 0], [False]

    def watch():  # sample the resident set every millisecond during the merge
        while not done[0]:
            now = rss()
            peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
            time.sleep(0.001)

    thread = threading.Thread(target=watch)
    thread.start()
    merge_stream.merge_config(cfg, out, progress=False)
    done[0] = True
    thread.join()
    print(json.dumps({"before": before, "peak": peak}))
    """
)


def part_memory(args, arch_sizes):
    import transformers

    rows = []
    for structure, (n_embd, n_layer, vocab) in arch_sizes.items():
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            cfg = transformers.GPT2Config(
                vocab_size=vocab,
                n_positions=64,
                n_embd=n_embd,
                n_layer=n_layer,
                n_head=8,
                bos_token_id=0,
                eos_token_id=0,
            )
            paths = []
            for i in range(2):
                torch.manual_seed(i)
                model = transformers.GPT2LMHeadModel(cfg)
                model.save_pretrained(tmp / f"m{i}", max_shard_size="20MB")
                paths.append(tmp / f"m{i}")
                ids = torch.randint(0, vocab, (2, 16))
                if structure == "diagonal":
                    lay = ff.ParamLayout.from_model(model)
                    F = ff.Diagonal(torch.rand(lay.size) + 0.1, lay)
                else:
                    F = ff.estimate(
                        model,
                        [{"input_ids": ids, "labels": ids}],
                        "categorical",
                        "empirical",
                        structure,
                        progress=False,
                    )
                F.save(tmp / f"f{i}.safetensors")
            # the largest merge unit: its parameters and one model's Fisher over them
            # (the diagonal entries, or the layer's K-FAC factors)
            shapes = {n: p.numel() * 4 for n, p in model.named_parameters()}
            unit_bytes, fisher_unit_bytes = 0, 0
            for unit, names in ff.apps.merge_units(F).items():
                theta = sum(shapes[n] for n in names)
                if F.structure == "diagonal":
                    fisher = theta
                elif unit in F.groups():
                    block = F.block(unit)
                    fisher = sum(t.numel() * 4 for t in block._state()[0].values())
                else:
                    fisher = theta
                if theta + fisher > unit_bytes + fisher_unit_bytes:
                    unit_bytes, fisher_unit_bytes = theta, fisher
            (tmp / "merge.yaml").write_text(
                "models:\n"
                + "".join(f"  - {{model: m{i}, fisher: f{i}.safetensors}}\n" for i in range(2))
                + "damping: 1.0\nmax_shard_size: 20MB\n"
            )
            res = subprocess.run(
                [sys.executable, "-c", _CHILD, str(tmp / "merge.yaml"), str(tmp / "out")],
                capture_output=True,
                text=True,
                check=True,
            )
            mem = json.loads(res.stdout.strip().splitlines()[-1])
            report = json.loads((tmp / "out" / "merge_report.json").read_text())
            shard_bytes = report["largest_shard_bytes"]
            inputs = 2 * (unit_bytes + fisher_unit_bytes)
            extra = mem["peak"][0] - mem["before"][0]
            extra_total = mem["peak"][1] - mem["before"][1]
            P = sum(p.numel() for p in model.parameters())
            rows.append(
                (
                    structure,
                    P,
                    inputs,
                    shard_bytes,
                    extra,
                    extra / (inputs + shard_bytes),
                    extra / (2 * unit_bytes + shard_bytes),
                    extra_total,
                )
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-mnist", action="store_true", help="only the memory part")
    parser.add_argument(
        "--memory-structures", default="diagonal", help="Fishers of the memory part (diagonal,kfac)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--sum-max-iter",
        type=int,
        default=300,
        help="cap on CG steps with the old factor-wise-sum preconditioner",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results file (default bench/RESULTS_merge.md; with --skip-mnist: print only)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.fisher_rows = 1000 if args.quick else 3000
    rows, n, solver = ([], 0, []) if args.skip_mnist else part_mnist(args)
    for r in rows:
        print(r, flush=True)
    size = (256, 4, 8000) if args.quick else (512, 6, 16000)
    sizes = {s: size for s in args.memory_structures.split(",")}
    mem = part_memory(args, sizes)
    lines = [
        "# Merging",
        "",
        f"Command: `python bench/bench_merge.py{' --quick' if args.quick else ''}`. Shared "
        "2-core CPU machine.",
        "",
        f"MNIST, MLP 784-256-256-10: common initialisation = 3 epochs on 1000 images of all "
        f"classes; each fine-tune = {args.epochs} epoch(s) of Adam (lr 1e-3) on the images of "
        f"its five classes among the first {n}; Fishers on {args.fisher_rows} images of each "
        "model's own half; damping 1e-3. Accuracy on the 10000 test images (all classes).",
        "",
        "| model | test accuracy (0-9) | merge time (s, incl. Fisher) |",
        "|---|---|---|",
        *[f"| {name} | {acc:.4f} | {secs:.2f} |" for name, acc, secs in rows],
        "",
        "K-FAC merge solve per layer (float64 from the float32 Fishers, factors projected "
        "onto the PSD cone; relative residual tolerance 1e-8; ‖x‖ = the step from the "
        "average, (Σ wᵢFᵢ + λI)⁺ Σ wᵢFᵢ(θᵢ − θ̄)): "
        "conjugate-gradient steps and seconds with the two-term preconditioner "
        "(simultaneous diagonalisation; the default) and with the factor-wise K-FAC sum "
        f"(the previous one, capped at {args.sum_max_iter} steps), interleaved on the same "
        "right-hand sides. 2 models: the two fine-tunes; 3 models: with the common "
        "initialisation (its Fisher on 1000 images of all classes). 0 steps = the direct "
        "solve (two models, no damping).",
        "",
        "| models | damping | layer | (n_out, n_in+1) | pair: steps | pair: s | pair: residual "
        "| pair: ‖x‖ | sum: steps | sum: s | sum: residual | sum: ‖x‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {label} | {lam:g} | {unit} | {dims} | {c['pair'][0]} | {c['pair'][1]:.2f} "
            f"| {c['pair'][2]:.1e} | {c['pair'][3]:.3g} | {c['sum'][0]} | {c['sum'][1]:.2f} "
            f"| {c['sum'][2]:.1e} | {c['sum'][3]:.3g} |"
            for label, lam, unit, dims, c in solver
        ],
        "",
        "`fisherflow merge` of two GPT-2-style checkpoints (float32, sharded at 20 MB, "
        "Fishers in files): peak resident memory of the merge (sampled every millisecond) "
        "above the process's memory before it. The bound: the tensor set any streaming "
        "merge must hold at once = the output shard being filled + for the largest merge "
        "unit, each input's parameters and its Fisher over them (the token embedding and "
        "its diagonal here). Target ≤ 1.5×; the last ratio leaves the Fishers out of the "
        "bound (parameters only, the bound used before Fishers were streamed). Anonymous "
        "memory (RssAnon) is the memory the merge holds; total RSS also counts the input "
        "files' pages that safetensors maps and that the kernel can drop.",
        "",
        "| Fisher | parameters | inputs: 2 × (largest unit + its Fisher) (MB) "
        "| largest output shard (MB) | peak anonymous above baseline (MB) "
        "| ratio to inputs + shard | ratio to parameters + shard "
        "| peak total RSS above baseline (MB) |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {s} | {P:,} | {u / 1e6:.1f} | {sh / 1e6:.1f} | {e / 1e6:.1f} | {r:.2f} "
            f"| {r0:.2f} | {tot / 1e6:.1f} |"
            for s, P, u, sh, e, r, r0, tot in mem
        ],
        "",
    ]
    if args.out is None and not args.skip_mnist:
        args.out = str(Path(__file__).parent / "RESULTS_merge.md")
    if args.out is not None:  # --skip-mnist alone must not overwrite the MNIST table
        Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
