"""K-FAC versus dense: time and memory of inverse, mv and sample, and their scaling.

A 4-layer MLP of width w (Linear(w, w) with bias, four times) has P = 4 (w² + w)
parameters. K-FAC stores two factors per layer; the dense equivalent stores P².
Dense is run only where P² fits comfortably (its eigendecomposition is O(P³));
beyond that its memory is reported as what it would need.

Run: .venv/bin/python bench/bench_matrices.py [--widths 16 32 64 128 256 512 1024]
"""

from __future__ import annotations

import argparse
import time

import torch

from fisherflow.matrices import KFAC, Dense, FisherMatrix, KronGroup, ParamLayout

DTYPE = torch.float32
DAMPING = 1e-3


def mlp_kfac(width: int, gen: torch.Generator) -> KFAC:
    shapes, groups, A, G = {}, {}, {}, {}
    for i in range(4):
        shapes[f"{i}.weight"], shapes[f"{i}.bias"] = (width, width), (width,)
        groups[str(i)] = KronGroup(f"{i}.weight", f"{i}.bias")
        a = torch.randn(width + 1, 2 * width, generator=gen, dtype=DTYPE)
        g = torch.randn(width, 2 * width, generator=gen, dtype=DTYPE)
        A[str(i)], G[str(i)] = a @ a.T / (2 * width), g @ g.T
    return KFAC(groups, A, G, ParamLayout.from_shapes(shapes), num_samples=2 * width, kind="mc")


def storage(F: FisherMatrix) -> int:
    tensors, _ = F._state()
    return sum(t.numel() * t.element_size() for t in tensors.values())


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(F: FisherMatrix, fresh) -> dict[str, float]:
    v = torch.randn(F.size, dtype=DTYPE)
    inv_time = timed(lambda: fresh().inverse(DAMPING), repeat=2)
    inv = F.inverse(DAMPING)
    return {
        "inverse_s": inv_time,
        "mv_s": timed(lambda: F.mv(v), repeat=5),
        "sample_s": timed(lambda: F.sample(16, DAMPING), repeat=3),
        "bytes": storage(F),
        "inverse_bytes": storage(inv),
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--dense-max-params", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, damping {DAMPING}")
    header = (
        "| width | P | structure | inverse (s) | mv (ms) | sample×16 (ms) | storage | "
        "inverse storage |"
    )
    print(header)
    print("|" + "---|" * 8)
    for width in args.widths:
        gen = torch.Generator().manual_seed(width)
        F = mlp_kfac(width, gen)
        r = measure(F, lambda F=F: KFAC(F.kron_groups, F.A, F.G, F.layout, None, **F.meta))
        print(
            f"| {width} | {F.size:,} | kfac | {r['inverse_s']:.4f} | {1e3 * r['mv_s']:.2f} | "
            f"{1e3 * r['sample_s']:.2f} | {fmt_bytes(r['bytes'])} | "
            f"{fmt_bytes(r['inverse_bytes'])} |"
        )
        if F.size <= args.dense_max_params:
            D = Dense.from_fisher(F)
            d = measure(D, lambda D=D: Dense(D.matrix, D.layout, **D.meta))
            torch.testing.assert_close(
                D.mv(torch.ones(F.size)), F.mv(torch.ones(F.size)), rtol=1e-4, atol=1e-3
            )
            print(
                f"| {width} | {F.size:,} | dense | {d['inverse_s']:.4f} | {1e3 * d['mv_s']:.2f} | "
                f"{1e3 * d['sample_s']:.2f} | {fmt_bytes(d['bytes'])} | "
                f"{fmt_bytes(d['inverse_bytes'])} |"
            )
        else:
            need = F.size**2 * torch.finfo(DTYPE).bits // 8
            print(f"| {width} | {F.size:,} | dense | – | – | – | {fmt_bytes(need)} (not run) | – |")


if __name__ == "__main__":
    main()
