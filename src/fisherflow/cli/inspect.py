"""``fisherflow inspect FILE``: trace, spectrum, effective dimension, plots of a saved Fisher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``inspect`` subcommand."""
    p = subparsers.add_parser("inspect", help="summarise a saved Fisher (.safetensors)")
    p.add_argument("file")
    p.add_argument("--top", type=int, default=10, help="number of top eigenvalues")
    p.add_argument(
        "--damping",
        type=float,
        nargs="+",
        default=[1e-3, 1e-1, 1.0],
        help="λ values for the effective dimension tr F(F+λI)^-1",
    )
    p.add_argument("--plots", default=None, help="directory for a heatmap and a spectrum PNG")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary (and write plots)."""
    import torch

    from fisherflow.matrices import load
    from fisherflow.report import heatmaps, spectra, summary

    F = load(args.file)
    info = summary(F, args.top, args.damping)
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(args.file).stem
        if F.size <= 4000:
            info["heatmap"] = str(heatmaps({stem: F.to_dense()}, out / f"{stem}_heatmap.png"))
        if "top_eigenvalues" in info:
            info["spectrum"] = str(spectra({stem: F.eigvalsh()}, out / f"{stem}_spectrum.png"))
        else:
            info["spectrum"] = str(
                spectra(
                    {stem: torch.sort(F.diagonal()).values},
                    out / f"{stem}_spectrum.png",
                    "diagonal entries",
                )
            )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>20}: {v}")
    return 0
