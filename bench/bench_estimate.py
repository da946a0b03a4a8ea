"""Fisher estimation: fisherflow versus BackPACK, curvlinops and nngeometry.

Every cell is the wall-clock time of one call (warm-up first) divided by the time of
one plain ``loss.backward()`` forward+backward of the same model on the same batch
(sum-reduced cross-entropy), the two run alternately so that both see the same CPU
load: ``median/median``, then ``(min/min)`` (least disturbed by other processes). Peers are
imported lazily; a missing or unsupported case prints ``–`` and a reason below.

``--memory`` adds, for the exact kinds, each library's peak memory: every cell runs
in a fresh subprocess (glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, so that large
blocks go back to the system when freed and the resident size follows the live
tensors); the peak resident size (``VmHWM``, reset through ``/proc/self/clear_refs``)
during a call minus the resident size before it, for the first call ("cold": lazy
imports, caches, fisherflow's hook check) and the second ("warm").

Conventions (checked in the agreement table, which compares only deterministic kinds:
exact and empirical; MC estimates differ by their random labels):

* fisherflow holds the **sum** over observations; BackPACK and curvlinops (with a
  sum-reduced loss) too; nngeometry the **mean** (its numbers are multiplied by N).
* K-FAC: fisherflow ``A`` = mean of ``a aᵀ`` (bias as a trailing column of ones),
  ``G`` = sum of ``δ δᵀ`` (expand convention); peers split the scale differently,
  so the comparison is of ``G ⊗ A`` (scale-split invariant).  BackPACK's K-FAC for
  convolutions is a different approximation (its agreement on the CNN is not expected).
* "exact" = the GGN with the closed-form categorical output Fisher: ``C`` backward
  passes per observation position for every library (a transformer with ``S``
  positions needs ``S·C``; not timed there).

Run: .venv/bin/python bench/bench_estimate.py [--threads 2] [--repeats 7] [--cases mlp cnn
transformer small] [--quantities kfac_mc kfac_emp kfac_exact ekfac_mc] [--memory]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation import estimate
from fisherflow.estimation.api import clear_cache
from fisherflow.estimation.engine import clear_probe_cache

# ---------------------------------------------------------------------------- cases


class Block(nn.Module):
    """Pre-LN transformer block (``nn.MultiheadAttention``, GELU MLP)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: Tensor) -> Tensor:
        x = self.ln1(h)
        mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).triu(1)
        h = h + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class TinyLM(nn.Module):
    """Token + position embeddings, two blocks, final LayerNorm, linear head."""

    def __init__(self, vocab: int = 64, d: int = 128, seq: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, 4) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.ln(self.blocks(self.emb(ids) + self.pos(pos))))


def make_case(name: str) -> tuple[nn.Module, Tensor, Tensor, int]:
    """``(model, inputs, targets, classes)`` of a named case."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        x = torch.randn(512, 64, generator=g)
        return model, x, torch.randint(0, 10, (512,), generator=g), 10
    if name == "small":
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
        x = torch.randn(512, 20, generator=g)
        return model, x, torch.randint(0, 10, (512,), generator=g), 10
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
        x = torch.randn(128, 3, 8, 8, generator=g)
        return model, x, torch.randint(0, 10, (128,), generator=g), 10
    if name == "transformer":
        model = TinyLM()
        ids = torch.randint(0, 64, (16, 64), generator=g)
        return model, ids, torch.randint(0, 64, (16, 64), generator=g), 64
    raise ValueError(name)


CASE_TITLES = {
    "mlp": "MLP 64-256-256-10, batch 512",
    "cnn": "CNN conv16-conv32-linear 8×8, batch 128",
    "transformer": "transformer 2×(d=128, 4 heads), seq 64, batch 16, vocab 64",
    "small": "MLP 20-32-10 (P=1002), batch 512",
}

# ---------------------------------------------------------------------------- timing


def _sync() -> None:
    """Wait for queued GPU work, so that wall-clock times cover it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: The clock of every timing: wall (``perf_counter``) or this process's CPU time
#: (``process_time``, every thread; with one thread it is barely disturbed by other
#: processes sharing the cores, which a wall clock is not).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync()
        t0 = CLOCK[0]()
        fn()
        _sync()
        out.append(CLOCK[0]() - t0)
    return out


def interleaved(
    fn: Callable[[], Any], plain: Callable[[], Any], repeats: int
) -> tuple[list[float], list[float]]:
    """Times of ``fn`` and of ``plain``, alternating (so both see the same CPU load)."""
    fn()
    a, b = [], []
    for _ in range(repeats):
        _sync()
        t0 = CLOCK[0]()
        plain()
        _sync()
        t1 = CLOCK[0]()
        fn()
        _sync()
        t2 = CLOCK[0]()
        a.append(t2 - t1)
        b.append(t1 - t0)
    return a, b


def plain_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One forward + ``loss.backward()`` with a sum-reduced cross-entropy."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def run() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()

    return run


# ---------------------------------------------------------------------------- results
# A result is a flat diagonal, a {module: (A, G)} dict of K-FAC factors, a dense
# matrix, or None (timing only).

Result = Any

QUANTITIES = [
    ("first_emp", "diagonal empirical, first call (hook check not cached)"),
    ("diag_emp", "diagonal empirical"),
    ("diag_mc", "diagonal MC-1"),
    ("diag_exact", "diagonal exact"),
    ("kfac_mc", "K-FAC MC-1"),
    ("kfac_emp", "K-FAC empirical"),
    ("kfac_exact", "K-FAC exact"),
    ("ekfac_mc", "EKFAC MC-1"),
    ("dense_emp", "dense empirical (per-sample grads)"),
]
KINDS = {"emp": "empirical", "mc": "mc", "exact": "exact"}


def ff_methods(model: nn.Module, x: Tensor, y: Tensor, case: str) -> dict[str, Any]:
    """fisherflow: one callable per quantity returning a comparable result."""
    data = [(x, y)]

    def make(q: str) -> Callable[[], Result]:
        structure, kind = q.split("_")

        def run() -> Result:
            F = estimate(model, data, "categorical", KINDS[kind], structure, progress=False, seed=0)
            if structure == "diagonal":
                return F.diagonal()
            if structure == "kfac":
                return {g: (F.A[g], F.G[g]) for g in F.A}  # type: ignore[attr-defined]
            if structure == "dense":
                return F.to_dense()
            return None

        return run

    out: dict[str, Any] = {}
    for q, _ in QUANTITIES:
        if q == "dense_emp" and case != "small":
            out[q] = "P too large for dense"
            continue
        if q.endswith("exact") and case == "transformer":
            out[q] = "S·C = 4096 backward passes"
            continue
        if q == "first_emp":
            again = make("diagonal_emp")

            def first(again: Callable[[], Result] = again) -> Result:
                clear_probe_cache()
                clear_cache()
                return again()

            out[q] = first
            continue
        out[q] = make(q.replace("diag", "diagonal"))
    return out


def backpack_methods(model: nn.Module, x: Tensor, y: Tensor, case: str) -> dict[str, Any]:
    """BackPACK: diagonal (SumGradSquared, DiagGGNMC/Exact), KFAC (MC), KFLR (exact)."""
    try:
        from backpack import backpack, extend
        from backpack import extensions as ext
    except Exception as err:  # pragma: no cover
        return {"*": f"not installed ({type(err).__name__})"}
    if case == "transformer":
        return {"*": "needs nn.Sequential of supported layers (no attention/LayerNorm)"}
    m = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    params = list(m.parameters())
    names = [n for n, _ in m.named_parameters()]
    mods = {n.rsplit(".", 1)[0] for n in names}

    def run_ext(e: Any, attr: str, what: str) -> Callable[[], Result]:
        def run() -> Result:
            m.zero_grad(set_to_none=True)
            loss = loss_fn(m(x), y)
            with backpack(e):
                loss.backward()
            if what == "diag":
                return torch.cat([getattr(p, attr).reshape(-1) for p in params])
            if what == "dense":
                gs = torch.cat([getattr(p, attr).reshape(x.shape[0], -1) for p in params], 1)
                return gs.T @ gs
            res = {}
            for mod in mods:
                w = dict(m.named_parameters())[f"{mod}.weight"]
                b = dict(m.named_parameters()).get(f"{mod}.bias")
                G, A = getattr(w, attr)[0], getattr(w, attr)[1]
                res[mod] = (A, G, None if b is None else getattr(b, attr)[0])
            return res

        return run

    return {
        "diag_emp": run_ext(ext.SumGradSquared(), "sum_grad_squared", "diag"),
        "diag_mc": run_ext(ext.DiagGGNMC(mc_samples=1), "diag_ggn_mc", "diag"),
        "diag_exact": run_ext(ext.DiagGGNExact(), "diag_ggn_exact", "diag"),
        "kfac_mc": run_ext(ext.KFAC(mc_samples=1), "kfac", "kfac"),
        "kfac_emp": "no empirical K-FAC",
        "kfac_exact": run_ext(ext.KFLR(), "kflr", "kfac"),
        "ekfac_mc": "no EKFAC",
        "dense_emp": run_ext(ext.BatchGrad(), "grad_batch", "dense")
        if case == "small"
        else "P too large for dense",
    }


def curvlinops_methods(model: nn.Module, x: Tensor, y: Tensor, case: str) -> dict[str, Any]:
    """curvlinops: KFAC (type-2 / MC / empirical, expand) and EKFAC (MC)."""
    try:
        from curvlinops import EKFACLinearOperator, KFACLinearOperator
    except Exception as err:  # pragma: no cover
        return {"*": f"not installed ({type(err).__name__})"}
    if case == "transformer":
        return {"*": "K-FAC refuses Embedding, LayerNorm and attention parameters"}
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    model = copy.deepcopy(model)  # its hooks stay off the model the others time
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(x, y)]

    def make(cls: Any, fisher_type: str) -> Callable[[], Result]:
        def run() -> Result:
            op = cls(
                model,
                loss_fn,
                params,
                data,
                fisher_type=fisher_type,
                check_deterministic=False,
                separate_weight_and_bias=False,
                progressbar=False,
            )
            op.compute_kronecker_factors()
            if cls is EKFACLinearOperator:
                op.compute_eigenvalue_correction()
                return None
            return {
                k: (op._input_covariances[k], op._gradient_covariances[k])
                for k in op._gradient_covariances
            }

        return run

    return {
        "diag_emp": "no diagonal estimator (Hutchinson only)",
        "diag_mc": "no diagonal estimator (Hutchinson only)",
        "diag_exact": "no diagonal estimator (Hutchinson only)",
        "kfac_mc": make(KFACLinearOperator, "mc"),
        "kfac_emp": make(KFACLinearOperator, "empirical"),
        "kfac_exact": make(KFACLinearOperator, "type-2"),
        "ekfac_mc": make(EKFACLinearOperator, "mc"),
        "dense_emp": "not via per-sample gradients",
    }


def nngeometry_methods(model: nn.Module, x: Tensor, y: Tensor, case: str) -> dict[str, Any]:
    """nngeometry 0.4: FIM (exact), FIM_MonteCarlo, empirical via per-example losses.

    EKFAC includes ``update_diag`` (the eigenvalue correction), which ``PMatEKFAC``'s
    constructor leaves out.
    """
    try:
        from nngeometry.backend import TorchHooksJacobianBackend
        from nngeometry.metrics import FIM, FIM_MonteCarlo
        from nngeometry.object import PMatDense, PMatDiag, PMatEKFAC, PMatKFAC
    except Exception as err:  # pragma: no cover
        return {"*": f"not installed ({type(err).__name__})"}
    from torch.utils.data import DataLoader, TensorDataset

    model = copy.deepcopy(model)  # a failed call can leave its hooks on the model
    n = x.shape[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    fwd = model
    if case == "transformer":

        class Flat(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, ids: Tensor) -> Tensor:
                return self.model(ids).reshape(-1, 64)

        fwd = Flat()

    def emp_function(*d: Tensor) -> Tensor:
        out = fwd(d[0])
        return -nn.functional.cross_entropy(out, d[1], reduction="none")[:, None]

    def finish(F: Any, rep: Any) -> Result:
        if rep is PMatDiag:
            return F.get_diag() * n
        if rep is PMatDense:
            return F.to_torch() * n
        if rep is PMatKFAC:
            return {k: (v[0], v[1] * n) for k, v in F.data.items()}
        return None

    def make(rep: Any, mode: str) -> Callable[[], Result]:
        def run() -> Result:
            dev = str(x.device)  # nngeometry moves every batch to `device` (default cpu)
            if mode == "exact":
                F = FIM(fwd, loader, rep, variant="classif_logits", device=dev)
            elif mode == "mc":
                F = FIM_MonteCarlo(fwd, loader, rep, variant="classif_logits", trials=1, device=dev)
            else:
                gen = TorchHooksJacobianBackend(model=fwd, function=emp_function)
                F = rep(generator=gen, examples=loader)
            if rep is PMatEKFAC:
                # nngeometry's constructor stops at K-FAC in its eigenbasis; EKFAC's
                # eigenvalue correction (George et al., 2018) is this second pass
                F.update_diag(loader)
            return finish(F, rep)

        return run

    return {
        "diag_emp": make(PMatDiag, "emp"),
        "diag_mc": make(PMatDiag, "mc"),
        "diag_exact": make(PMatDiag, "exact") if case != "transformer" else "S·C passes",
        "kfac_mc": make(PMatKFAC, "mc"),
        "kfac_emp": make(PMatKFAC, "emp"),
        "kfac_exact": make(PMatKFAC, "exact") if case != "transformer" else "S·C passes",
        "ekfac_mc": make(PMatEKFAC, "mc"),
        "dense_emp": make(PMatDense, "emp") if case == "small" else "P too large for dense",
    }


PEERS: dict[str, Callable[[nn.Module, Tensor, Tensor, str], dict[str, Any]]] = {
    "BackPACK": backpack_methods,
    "curvlinops": curvlinops_methods,
    "nngeometry": nngeometry_methods,
}

# ---------------------------------------------------------------------------- agreement


def kron_rel(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor) -> float:
    """``‖A₁⊗G₁ − A₂⊗G₂‖_F / ‖A₁⊗G₁‖_F`` without forming the products."""
    a1, g1, a2, g2 = (t.double() for t in (a1, g1, a2, g2))
    n11 = (a1 * a1).sum() * (g1 * g1).sum()
    n22 = (a2 * a2).sum() * (g2 * g2).sum()
    n12 = (a1 * a2).sum() * (g1 * g2).sum()
    return float((n11 + n22 - 2 * n12).clamp_min(0).sqrt() / n11.sqrt())


def agree(q: str, ours: Result, theirs: Result, peer: str, model: nn.Module) -> str:
    """Max relative difference of two results of quantity ``q``, as text."""
    if ours is None or theirs is None:
        return "–"
    if isinstance(ours, Tensor):
        a, b = ours.double().reshape(-1), theirs.double().reshape(-1)
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        return f"{float((a - b).abs().max() / a.abs().max()):.1e}"
    worst = 0.0
    for mod, (A, G) in ours.items():
        key = mod if mod in theirs else None
        if key is None:
            # nngeometry keys by layer id "<module>"; BackPACK/curvlinops by name
            cands = [k for k in theirs if str(k).startswith(mod)]
            if not cands:
                return f"no factors for {mod}"
            key = cands[0]
        t = theirs[key]
        if peer == "BackPACK":
            A2, G2, _ = t
            A1 = A[:-1, :-1] if A.shape[0] == A2.shape[0] + 1 else A
            worst = max(worst, kron_rel(A1, G, A2, G2))
        else:
            A2, G2 = t
            if peer == "nngeometry":
                A2, G2 = t[0], t[1]
            worst = max(worst, kron_rel(A, G, A2, G2))
    return f"{worst:.1e}"


# ---------------------------------------------------------------------------- memory


def _rss_kib() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in KiB (Linux)."""
    with open("/proc/self/status") as f:
        text = f.read()
    found = [re.search(rf"{k}:\s+(\d+)", text) for k in ("VmRSS", "VmHWM")]
    return int(found[0].group(1)), int(found[1].group(1))  # type: ignore[union-attr]


def _peak_mb(fn: Callable[[], Result]) -> float:
    """Peak resident memory added during one call of ``fn`` (MB)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before, _ = _rss_kib()
    res = fn()
    _, peak = _rss_kib()
    del res
    return (peak - before) / 1024


def measure_memory(case: str, lib: str, q: str, threads: int) -> str:
    """``"cold warm"`` peaks (MB) of one cell, in this (fresh) process."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    model, x, y, _ = make_case(case)
    model.eval()
    plain_step(model, x, y)()  # the model's own lazy setup is no one's cost
    methods = (
        ff_methods(model, x, y, case) if lib == "fisherflow" else PEERS[lib](model, x, y, case)
    )
    fn = methods.get(q, methods.get("*", "unsupported"))
    if isinstance(fn, str):
        return "– –"
    return f"{_peak_mb(fn):.1f} {_peak_mb(fn):.1f}"


def memory_cells(case: str, libs: list[str], quantities: list[str], threads: int) -> list[str]:
    """Markdown rows of cold/warm peak memory, one fresh subprocess per cell."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for q in quantities:
        cells = []
        for lib in libs:
            cmd = [sys.executable, __file__, "--threads", str(threads), "--measure", case, lib, q]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            parts = run.stdout.split()
            if run.returncode != 0 or len(parts) != 2:
                cells.append("fails")
            elif parts[0] == "–":
                cells.append("–")
            else:
                cells.append(f"{parts[1]} ({parts[0]})")
        title = dict(QUANTITIES)[q]
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
    return rows


# ---------------------------------------------------------------------------- main


def main() -> None:
    """Run the benchmark and print Markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cases", nargs="+", default=["mlp", "cnn", "transformer", "small"])
    ap.add_argument("--peers", nargs="*", default=list(PEERS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (models and batches)")
    ap.add_argument(
        "--quantities", nargs="+", default=[q for q, _ in QUANTITIES], help="rows to time"
    )
    ap.add_argument("--memory", action="store_true", help="peak memory of the exact kinds")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="timing clock")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # case lib quantity
    args = ap.parse_args()
    if args.measure:
        print(measure_memory(*args.measure, threads=args.threads))
        return
    chosen = [(q, t) for q, t in QUANTITIES if q in args.quantities]
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats, {args.clock} clock"
    )
    notes: list[str] = []
    agreements: list[str] = []
    for case in args.cases:
        model, x, y, _ = make_case(case)
        model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
        model.eval()
        plain = plain_step(model, x, y)
        base = timed(plain, args.repeats, warmup=2)
        libs = {"fisherflow": ff_methods(model, x, y, case)}
        for peer in args.peers:
            libs[peer] = PEERS[peer](model, x, y, case)
        cells: dict[tuple[str, str], str] = {}
        results: dict[tuple[str, str], Result] = {}
        for lib, methods in libs.items():
            for q, _ in chosen:
                m = methods.get(q, methods.get("*", "unsupported"))
                if q == "first_emp" and lib != "fisherflow":
                    m = methods.get("diag_emp", methods.get("*", "unsupported"))
                    if not isinstance(m, str):
                        m = "same as diagonal empirical"
                if isinstance(m, str):
                    cells[q, lib] = "–"
                    if (lib != "fisherflow" or case != "small") and not m.startswith("same"):
                        notes.append(f"{case} / {lib} / {q}: {m}")
                    continue
                try:
                    res: list[Result] = [None]
                    reps = max(3, args.repeats // 2) if q.endswith("exact") else args.repeats

                    def call(m: Callable[[], Result] = m, res: list[Result] = res) -> None:
                        res[-1] = m()

                    ts, bs = interleaved(call, plain, reps)
                    base += bs
                    results[q, lib] = res[-1]
                    med = statistics.median(ts) / statistics.median(bs)
                    cells[q, lib] = f"{med:.2f}× ({min(ts) / min(bs):.2f}×)"
                except Exception as err:
                    cells[q, lib] = "fails"
                    msg = str(err).splitlines()[0][:90] if str(err) else ""
                    notes.append(f"{case} / {lib} / {q}: {type(err).__name__}: {msg}")
        base += timed(plain, args.repeats, warmup=1)  # drift check: both ends of the run
        med = statistics.median(base)
        spread = (max(base) - min(base)) / med
        print(f"\n### {CASE_TITLES[case]}\n")
        print(
            f"plain forward+backward: min {1e3 * min(base):.2f} ms, median {1e3 * med:.2f} ms "
            f"(max−min = {100 * spread:.0f}% of median: CPU shared, noisy)\n"
        )
        print("cells: median(method)/median(plain) (min/min), interleaved with plain runs\n")
        print("| quantity | " + " | ".join(libs) + " |")
        print("|---|" + "---|" * len(libs))
        for q, title in chosen:
            print(f"| {title} | " + " | ".join(cells[q, lib] for lib in libs) + " |")
        exact = [q for q, _ in chosen if q.endswith("exact")]
        if args.memory and exact and args.device == "cpu":
            print("\npeak memory added by one call, MB: warm (cold, first call)\n")
            print("| quantity | " + " | ".join(libs) + " |")
            print("|---|" + "---|" * len(libs))
            print("\n".join(memory_cells(case, list(libs), exact, args.threads)))
        for q, title in chosen:
            if q.endswith("_mc") or (q, "fisherflow") not in results:
                continue
            for lib in libs:
                if lib != "fisherflow" and (q, lib) in results:
                    if results[q, lib] is None:
                        continue
                    rel = agree(q, results[q, "fisherflow"], results[q, lib], lib, model)
                    agreements.append(f"| {case} | {title} | {lib} | {rel} |")
        del results
    print("\n### Agreement with peers (max |ours − theirs| / max |ours|; K-FAC: ‖ΔG⊗A‖/‖G⊗A‖)\n")
    print("| case | quantity | peer | rel. difference |\n|---|---|---|---|")
    print("\n".join(agreements))
    print("\nSkipped or failed:\n")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
