"""``fisherflow demo``: every kind × structure on scikit-learn digits, as a Markdown report.

torch is imported inside the functions (see :mod:`fisherflow.cli`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fisherflow.cli.args import HelpFormatter, positive_int

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["register", "run", "run_demo"]

KINDS = ("exact", "mc", "empirical")
SHOWN_STRUCTURES = ("dense", "diagonal", "block", "kfac", "ekfac", "lowrank")

#: Further report sections, as modules under ``fisherflow.cli``: each defines
#: ``demo_section(out: Path) -> list[str]`` (Markdown lines; plots written into ``out``).
SECTIONS: tuple[str, ...] = ("demo_optim", "demo_uncertainty", "demo_ewc_merge", "demo_prune")

HEATMAP_CAPTION = (
    "Grey stripes: the {zero} of {size} parameters whose gradient is 0 on every image "
    "(weights reading an input that is 0 in every digit, such as a border pixel, or a "
    "unit that ReLU switches off on every image) have rows and columns of F that are "
    "exactly 0. Grey blocks: entries a structure does not represent (K-FAC, EKFAC and "
    "block keep no cross-layer terms). Black: |F_ij| at or below the floor of the "
    "colour scale, {decades} decades below the largest entry (e.g. EKFAC's rounding "
    "residue where the exact Fisher is 0)."
)
SPECTRA_CAPTION = (
    "Eigenvalues, largest first. The empirical Fisher has rank ≤ the number of "
    "examples and low-rank has r nonzero eigenvalues: the rest lie on the floor."
)


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="Fisher approximations on digits: a report with plots",
        description="Train a small MLP and CNN on scikit-learn digits, estimate their "
        f"Fisher with every kind ({', '.join(KINDS)}) and structure "
        f"({', '.join(SHOWN_STRUCTURES)}), and write a Markdown report with heatmaps "
        "and spectra.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="fisherflow-report", help="output directory")
    p.add_argument("--rows", type=positive_int, default=128, help="examples used for the Fisher")
    p.add_argument("--rank", type=positive_int, default=20, help="rank of the low-rank structure")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"demo: {message}", file=sys.stderr, flush=True)


def _models() -> dict[str, nn.Module]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
    )
    return {"MLP": mlp, "CNN": cnn}


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> float:
    import torch
    from torch import nn

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 128]), y[i : i + 128]).backward()
            opt.step()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_demo(out: str | Path, rows: int = 128, rank: int = 20, progress: bool = True) -> Path:
    """Train, estimate every kind × structure, and write ``out/README.md`` with PNGs.

    Args:
        out: Output directory (created).
        rows: Examples the Fisher is estimated on.
        rank: Rank of the low-rank structure.
        progress: Print a line per step to stderr.

    Returns:
        The path of the Markdown report.
    """
    import torch

    from fisherflow.cli.demo_data import digits
    from fisherflow.estimation import estimate
    from fisherflow.report import heatmaps, spectra, write_text
    from fisherflow.report.plots import FLOOR_DECADES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = digits(torch.float32, images=True)
    lines = [
        "# fisherflow demo: Fisher approximations on digits",
        "",
        "A small MLP and a small CNN are trained on scikit-learn's digits (1797 images, "
        "8×8, 10 classes). fisherflow then estimates each model's Fisher information on "
        f"the first {rows} images with every kind (exact = the model's own predictive "
        "distribution in closed form, mc = one sampled label per image, empirical = the "
        "observed labels) and every structure. Each approximation is compared with the "
        "exact dense Fisher: the relative Frobenius error ‖F̂ − F‖/‖F‖ and the trace "
        "recovery tr F̂ / tr F (1 is perfect), with the wall-clock time of the estimate. "
        "The heatmaps show log10 |F_ij| over all parameters, layers in order (cyan lines "
        "mark the layer boundaries); the spectra show each approximation's eigenvalues.",
        "",
    ]
    models = _models()
    for m_index, (name, model) in enumerate(models.items(), 1):
        step = f"[{m_index}/{len(models)}] {name}"
        t0 = time.perf_counter()
        acc = _train(model, x, y)
        _say(progress, f"{step}: trained (accuracy {acc:.3f}) in {time.perf_counter() - t0:.1f} s")
        model = model.double()
        xs, ys = x[:rows].double(), y[:rows]
        data = [(xs[i : i + 64], ys[i : i + 64]) for i in range(0, rows, 64)]
        P = sum(p.numel() for p in model.parameters())
        lines += [f"## {name} ({P} parameters, train accuracy {acc:.3f}, {rows} examples)", ""]
        results: dict[tuple[str, str], Any] = {}
        for kind in KINDS:
            t0 = time.perf_counter()
            for structure in SHOWN_STRUCTURES:
                t = time.perf_counter()
                F = estimate(
                    model, data, "categorical", kind, structure, rank=rank, seed=0, progress=False
                )
                results[kind, structure] = (F, time.perf_counter() - t)
            _say(
                progress,
                f"{step}: kind {kind!r}, {len(SHOWN_STRUCTURES)} structures in "
                f"{time.perf_counter() - t0:.1f} s",
            )
        exact = results["exact", "dense"][0].to_dense()
        layout = results["exact", "dense"][0].layout
        ex_norm, ex_tr = exact.norm(), exact.trace()
        lines += [
            "| kind | structure | rel. Frobenius error | trace recovery | time (s) |",
            "|---|---|---|---|---|",
        ]
        for (kind, structure), (F, secs) in results.items():
            D = F.to_dense()
            err = float((D - exact).norm() / ex_norm)
            lines.append(
                f"| {kind} | {structure} | {err:.3g} | {float(D.trace() / ex_tr):.3f} "
                f"| {secs:.2f} |"
            )
        panels = {
            "true Fisher (exact, dense)": exact,
            "empirical Fisher": results["empirical", "dense"][0].to_dense(),
            "K-FAC": results["exact", "kfac"][0].to_dense(),
            "EKFAC": results["exact", "ekfac"][0].to_dense(),
            "block": results["exact", "block"][0].to_dense(),
            f"low-rank (r={rank})": results["exact", "lowrank"][0].to_dense(),
        }
        zero = int((exact.diagonal() == 0).sum())
        caption = HEATMAP_CAPTION.format(zero=zero, size=P, decades=f"{FLOOR_DECADES:.0f}")
        heat = heatmaps(
            panels,
            out / f"{name.lower()}_heatmaps.png",
            f"{name}: log10 |F_ij| of each approximation, {rows} digits",
            layout=layout,
            caption=caption,
        )
        spec = spectra(
            {k: torch.linalg.eigvalsh(v) for k, v in panels.items()},
            out / f"{name.lower()}_spectra.png",
            f"{name}: eigenvalues of each approximation",
            caption=SPECTRA_CAPTION,
        )
        _say(progress, f"{step}: wrote {heat.name} and {spec.name}")
        lines += [
            "",
            f"![{name} heatmaps]({heat.name})",
            "",
            caption,
            "",
            f"![{name} spectra]({spec.name})",
            "",
            SPECTRA_CAPTION,
            "",
        ]
    for section in SECTIONS:
        t0 = time.perf_counter()
        lines += importlib.import_module(f"fisherflow.cli.{section}").demo_section(out)
        _say(progress, f"section {section} in {time.perf_counter() - t0:.1f} s")
    return write_text(out / "README.md", "\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where the report is."""
    t = time.perf_counter()
    progress = not getattr(args, "quiet", False)
    _say(
        progress,
        f"training 2 models and estimating {len(KINDS) * len(SHOWN_STRUCTURES)} "
        "Fishers each on digits",
    )
    report = run_demo(args.out, args.rows, args.rank, progress=progress)
    print(f"wrote {report} in {time.perf_counter() - t:.1f} s")
    return 0
