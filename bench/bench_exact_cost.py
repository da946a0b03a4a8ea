"""What the exact kind costs on sequence models: one backward per class where it can.

Each cell is the wall-clock time of one ``ff.estimate(..., kind="exact")`` divided by
the time of one plain forward + ``loss.backward()`` on the same batch (sum-reduced
cross-entropy), the two run alternately: ``min/min``, then ``(median/median)``. The
backward passes per estimate are counted (cotangents given to ``torch.autograd.grad``
on a warm cache). "before" forces the per-(position, class) path of every layer;
"after" is the default (position-local layers from one backward per class). The last
column is the largest difference between the two results, relative to the largest
entry.

Cases: an embedding → MLP → logits model (every layer position-local), an embedding
bigram model on the same 20,000 tokens as 100 sequences of 200 or 2,000 of 10, and a
small causal transformer (layers after its last attention local, the rest unchanged).

Run: .venv/bin/python bench/bench_exact_cost.py [--threads 2] [--repeats 3]
[--before-repeats 1] [--cases mlp mlp16 bigram200 bigram10 transformer] [--no-before]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

import fisherflow as ff
from bench_estimate import plain_step  # the same plain step as the peers' benchmark
from fisherflow.estimation import engine
from fisherflow.estimation.positions import CostNotice


class EmbedMLP(nn.Module):
    """Token embedding → pre-LN GELU MLP (residual) → LayerNorm → linear head."""

    def __init__(self, vocab: int = 64, d: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        return self.head(self.ln(h + self.mlp(self.ln1(h))))


class Bigram(nn.Module):
    """An embedding whose rows are the next token's logits."""

    def __init__(self, vocab: int = 65) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.emb(ids)


class SmallLM(nn.Module):
    """Token + position embeddings, one causal pre-LN block, LayerNorm, linear head."""

    def __init__(self, vocab: int = 32, d: int = 64, seq: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(t, device=ids.device))
        x = self.ln1(h)
        mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)
        h = h + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln(h))


#: ``name: (title, model factory, rows, positions, vocabulary)``.
CASES: dict[str, tuple[str, Callable[[], nn.Module], int, int, int]] = {
    "mlp": ("embedding→MLP→logits, d=128, batch 16 × seq 64, vocab 64", EmbedMLP, 16, 64, 64),
    "mlp16": ("embedding→MLP→logits, d=128, batch 16 × seq 16, vocab 64", EmbedMLP, 16, 16, 64),
    "bigram200": ("bigram, 100 sequences × 200 tokens, vocab 65", Bigram, 100, 200, 65),
    "bigram10": ("bigram, 2,000 sequences × 10 tokens, vocab 65", Bigram, 2000, 10, 65),
    "transformer": (
        "causal transformer 1×(d=64, 4 heads), batch 8 × seq 16, vocab 32",
        lambda: SmallLM(),
        8,
        16,
        32,
    ),
}


def _data(rows: int, positions: int, vocab: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, positions), generator=g)
    return ids, torch.randint(0, vocab, (rows, positions), generator=g)


def interleaved(
    fn: Callable[[], Any], plain: Callable[[], Any], repeats: int
) -> tuple[list[float], list[float]]:
    """Times of ``fn`` and of ``plain``, alternating (so both see the same CPU load)."""
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        a.append(t2 - t1)
        b.append(t1 - t0)
    return a, b


@contextmanager
def per_position_path(on: bool) -> Iterator[None]:
    """Force every layer onto the per-(position, class) passes while ``on``."""
    split = engine._split_local
    if on:
        engine._split_local = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        engine._split_local = split  # type: ignore[assignment]


@contextmanager
def counted() -> Iterator[list[int]]:
    """Count backward passes (cotangents given to ``torch.autograd.grad``)."""
    grad, seen = torch.autograd.grad, [0]

    def count(outputs: Any, inputs: Any, grad_outputs: Any = None, **kw: Any) -> Any:
        if grad_outputs is not None:
            g = grad_outputs if torch.is_tensor(grad_outputs) else grad_outputs[0]
            seen[0] += g.shape[0] if kw.get("is_grads_batched") else 1
        return grad(outputs, inputs, grad_outputs, **kw)

    torch.autograd.grad = count  # type: ignore[assignment]
    try:
        yield seen
    finally:
        torch.autograd.grad = grad


def _flat(F: Any, structure: str) -> Tensor:
    """The diagonal, or K-FAC's factors side by side (never the dense matrix)."""
    if structure == "diagonal":
        return F.diagonal()  # type: ignore[no-any-return]
    return torch.cat([t.reshape(-1) for g in sorted(F.A) for t in (F.A[g], F.G[g])])


def run_case(name: str, structure: str, repeats: int, before_repeats: int) -> list[str]:
    """One row: after and before ratios, passes, and the largest relative difference."""
    _, make, rows, positions, vocab = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    x, y = _data(rows, positions, vocab)
    plain = plain_step(model, x, y)
    cells, results = [], []
    for before, reps in ((False, repeats), (True, before_repeats)):
        if reps <= 0:
            cells += ["–", "–"]
            continue
        last: list[Any] = []

        def fn(last: list[Any] = last) -> None:
            last[:] = [
                ff.estimate(model, [(x, y)], "categorical", "exact", structure, progress=False)
            ]

        with per_position_path(before):
            if not before:
                fn()  # warm-up: the hook check and the locality probe are cached
            with counted() as seen:
                t, p = interleaved(fn, plain, reps)
        results.append(last[0])
        ratio = f"{min(t) / min(p):.0f}× ({statistics.median(t) / statistics.median(p):.0f}×)"
        cells += [ratio, str(seen[0] // reps)]
    if len(results) == 2:
        a, b = (_flat(r, structure) for r in results)
        cells.append(f"{float((a - b).abs().max() / b.abs().max()):.1e}")
    else:
        cells.append("–")
    return cells


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before-repeats", type=int, default=1)
    ap.add_argument("--no-before", action="store_true")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--structures", nargs="*", default=["diagonal", "kfac"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", CostNotice)  # the long runs are the point here
    before = 0 if args.no_before else args.before_repeats
    print(
        "| case | structure | after: time ÷ plain step | passes | before | passes "
        "| max rel. diff |\n|---|---|---|---|---|---|---|"
    )
    for name in args.cases:
        for structure in args.structures:
            cells = run_case(name, structure, args.repeats, before)
            print(f"| {CASES[name][0]} | {structure} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
