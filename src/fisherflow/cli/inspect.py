"""``fisherflow inspect FILE``: trace, spectrum, effective dimension, plots of a saved Fisher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fisherflow.cli.args import HelpFormatter, positive_float, positive_int

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``inspect`` subcommand."""
    p = subparsers.add_parser(
        "inspect",
        help="summarise a saved Fisher (.safetensors)",
        description="Print the structure, kind, trace, top eigenvalues and effective "
        "dimensions of a saved Fisher; with --plots, draw its log10 |F_ij| heatmap and "
        "its spectrum.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("file", help="a Fisher saved by fisherflow (.safetensors)")
    p.add_argument("--top", type=positive_int, default=10, help="number of top eigenvalues")
    p.add_argument(
        "--damping",
        type=positive_float,
        nargs="+",
        default=[1e-3, 1e-1, 1.0],
        help="λ values (> 0) for the effective dimension tr F(F+λI)^-1",
    )
    p.add_argument(
        "--plots",
        default=None,
        help="directory for FILE_heatmap.png (P ≤ 4000) and FILE_spectrum.png",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary (and write plots)."""
    from fisherflow.matrices import load
    from fisherflow.report import heatmaps, spectra, summary

    F = load(args.file)
    info = summary(F, args.top, args.damping)
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        name = Path(args.file).name
        stem = Path(args.file).stem
        what = (
            f"{F.structure} Fisher, kind {F.kind}, {F.likelihood}, "
            f"{F.num_samples:g} observations, P = {F.size}"
        )
        if F.size <= 4000:
            info["heatmap"] = str(
                heatmaps(
                    {what: F.to_dense()},
                    out / f"{stem}_heatmap.png",
                    f"{name}: log10 |F_ij|",
                    layout=F.layout,
                )
            )
        if "top_eigenvalues" in info:
            info["spectrum"] = str(
                spectra({what: F.eigvalsh()}, out / f"{stem}_spectrum.png", f"{name}: eigenvalues")
            )
        else:
            info["spectrum"] = str(
                spectra(
                    {what: F.diagonal()},
                    out / f"{stem}_spectrum.png",
                    f"{name}: diagonal entries (its eigenvalues are not available)",
                    ylabel="diagonal entry F_ii",
                )
            )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>20}: {v}")
    return 0
