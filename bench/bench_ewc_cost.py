"""Cost of the K-FAC EWC penalty plus its gradient against one forward+backward.

The penalty ``strength/2 · δᵀFδ`` with ``F = G ⊗ A`` per layer costs one product
``G Δ A`` per layer, ``2(n_out² n_cols + n_out n_cols²)`` flops, whatever the batch;
a forward+backward costs about ``6 · tokens · Σ n_out n_in`` flops for the layers'
products (plus attention), so the ratio falls as ``1 / tokens``. Measured here,
interleaved, on

1. the permuted-MNIST MLP 784-256-256-10 of ``bench_continual.py`` at several batch
   sizes (the issue's batch 128 among them), and
2. a Shakespeare-character GPT (Hugging Face GPT-2 architecture, 4 blocks, width
   128, 4 heads, context 128, 81 characters) at several batches of 128 tokens (the
   issue's 8 × 128 among them),

for ``ff.apps.EWC.penalty`` (the K-FAC path: layers of one shape batched, parameters
read by name) and for the flat path it replaced (``ewc_penalty`` on the flattened,
NaN-checked parameter vector). Flops are counted with
``torch.utils.flop_counter.FlopCounterMode`` for the forward+backward and from the
factor shapes for the penalty. Random weights and an empirical K-FAC Fisher of one
batch: the cost does not depend on their values.

Run: ``python bench/bench_ewc_cost.py [--quick] [--threads 1]``; writes
``bench/RESULTS_ewc_cost.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))

import fisherflow as ff
from bench_continual import make_model
from fisherflow.apps._params import flat_params
from fisherflow.apps.ewc import ewc_penalty


def penalty_flops(F: ff.KFAC) -> int:
    """Flops of one ``Fδ`` (value and gradient): per layer G Δ A, plus the rest."""
    total = 2 * F.rest.numel()
    for g in F.kron_groups:
        n_out, n_cols = F.dims[g]
        left = 2 * n_out * n_out * n_cols if F.G[g].dim() == 2 else n_out * n_cols
        right = 2 * n_out * n_cols * n_cols if F.A[g].dim() == 2 else n_out * n_cols
        total += left + right + 2 * n_out * n_cols  # and the inner product
    return total


def _mlp(batch: int):
    model = make_model()
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    data = [(x[:128], y[:128])]
    return model, loss, data


def _gpt(sequences: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=81, n_positions=128, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 81, (sequences, 128), generator=torch.Generator().manual_seed(0))

    def loss():
        return model(input_ids=ids, labels=ids).loss

    data = [{"input_ids": ids[:2], "labels": ids[:2]}]
    return model, loss, data


def measure(build, size: int, repeats: int) -> dict[str, float]:
    model, loss, data = build(size)
    F = ff.estimate(model, data, "categorical", "empirical", "kfac", progress=False)
    anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    ewc = ff.apps.EWC(F, anchor, strength=1.0)
    flat_anchor = ewc.flat_anchor

    def fwd_bwd():
        model.zero_grad()
        loss().backward()

    def fast():
        model.zero_grad()
        ewc.penalty(model).backward()

    def flat():
        model.zero_grad()
        delta = flat_params(model, F.layout, "model") - flat_anchor
        ewc_penalty(F, delta, 1.0).backward()

    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    fb_flops = counter.get_total_flops()
    for f in (fwd_bwd, fast, flat):  # warm-up
        f()
    ratios: dict[str, list[float]] = {"fast": [], "flat": []}
    for _ in range(repeats):  # interleaved
        t0 = time.perf_counter()
        fwd_bwd()
        t1 = time.perf_counter()
        fast()
        t2 = time.perf_counter()
        flat()
        t3 = time.perf_counter()
        ratios["fast"].append((t2 - t1) / (t1 - t0))
        ratios["flat"].append((t3 - t2) / (t1 - t0))
    return {
        "fast_min": min(ratios["fast"]),
        "fast_med": statistics.median(ratios["fast"]),
        "flat_min": min(ratios["flat"]),
        "flat_med": statistics.median(ratios["flat"]),
        "pen_flops": penalty_flops(F),
        "fb_flops": fb_flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS_ewc_cost.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (10 if args.quick else 30)
    cases = [("MLP 784-256-256-10", _mlp, b, f"{b}", b) for b in (128, 512, 2048, 8192)]
    cases += [
        ("char GPT d=128 × 4", _gpt, s, f"{s} × 128", s * 128)
        for s in ((2, 8, 32) if args.quick else (2, 8, 32, 64))
    ]
    rows = []
    for name, build, size, label, tokens in cases:
        r = measure(build, size, repeats)
        flop_ratio = r["pen_flops"] / r["fb_flops"]
        rows.append((name, label, tokens, r, flop_ratio))
        print(rows[-1], flush=True)
    lines = [
        "# Cost of the K-FAC EWC penalty + gradient",
        "",
        f"Command: `python bench/bench_ewc_cost.py{' --quick' if args.quick else ''} "
        f"--threads {args.threads}`. CPU, {args.threads} thread(s), on a shared 2-core "
        f"machine (other jobs running: use the ratios, measured interleaved over {repeats} "
        "repeats, not the absolute times).",
        "",
        "Ratio = (penalty + its gradient) / (one forward+backward of the model's loss on "
        "the batch). `EWC.penalty` is the K-FAC path (same-shape layers batched, "
        "parameters read by name); `flat` is `ewc_penalty` on the flattened parameters, "
        "the path `EWC.penalty` took before. Flop ratio = penalty flops (from the "
        "factor shapes) / forward+backward flops (`FlopCounterMode`); the batch where "
        "0.2× is met is `tokens × measured median ratio / 0.2` (the ratio falls as "
        "1/tokens).",
        "",
        "| model | batch | tokens | penalty Mflop | fwd+bwd Mflop | flop ratio "
        "| EWC.penalty min | EWC.penalty median | flat min | flat median "
        "| tokens for 0.2× (measured) | tokens for 0.2× (flops) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {label} | {tokens} | {r['pen_flops'] / 1e6:.0f} "
            f"| {r['fb_flops'] / 1e6:.0f} | {fr:.3f} | {r['fast_min']:.3f} "
            f"| **{r['fast_med']:.3f}** | {r['flat_min']:.3f} | {r['flat_med']:.3f} "
            f"| {tokens * r['fast_med'] / 0.2:.0f} | {tokens * fr / 0.2:.0f} |"
            for name, label, tokens, r, fr in rows
        ],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
