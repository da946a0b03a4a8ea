"""``fisherflow prune``: a Hugging Face checkpoint and its Fisher in, a pruned checkpoint out.

The checkpoint is a directory with ``config.json`` and safetensors weights (never a
pickle), loaded with ``AutoModelForCausalLM``; the Fisher is a file written by
``F.save`` (``fisherflow estimate`` on the same model), whose layout must name the
model's parameters. The output directory is written complete or not at all: into a
temporary directory beside it, renamed at the end; it holds the pruned weights
(``save_pretrained``, safetensors), the config, every other file of the input
directory (tokenizer, ...) and ``prune_report.json`` (method, pattern, sparsity per
pruned parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fisherflow.cli.args import HelpFormatter

__all__ = ["load_checkpoint", "register", "run", "write_checkpoint"]

#: Files of the input directory that ``save_pretrained`` writes itself.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
#: ``ff.apps.prune``'s methods and scopes (spelled here: ``--help`` imports no torch).
METHODS = ("magnitude", "wanda", "obd", "obs", "sparsegpt")
SCOPES = ("layer", "global", "row")
_REWRITTEN = ("config.json", "generation_config.json", "model.safetensors.index.json")


def register(subparsers: Any) -> None:
    """Add the ``prune`` subcommand."""
    p = subparsers.add_parser(
        "prune",
        help="prune a Hugging Face checkpoint by magnitude, Wanda, OBD or OBS",
        description="Prune a Hugging Face checkpoint with its Fisher (ff.apps.prune) and "
        "write the pruned checkpoint, complete or not at all.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--fisher", default=None, help=".safetensors Fisher from F.save / estimate")
    p.add_argument(
        "--sparsity", type=float, default=None, help="fraction pruned, in [0, 1) (N:M: 1 - N/M)"
    )
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4")
    p.add_argument("--method", default="obs", choices=METHODS, help="saliency and update")
    p.add_argument("--scope", default="layer", choices=SCOPES, help="weights compared together")
    p.add_argument("--params", nargs="+", default=None, help="parameter names to prune")
    p.add_argument("--damping", type=float, default=0.0, help="λ added to F's diagonal")
    p.add_argument(
        "--rel-damping", type=float, default=0.0, help="λ relative to each OBS unit's diagonal"
    )
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(func=run)


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """A causal LM from a local directory of safetensors weights, every tensor present.

    Raises:
        ValueError: If ``path`` is not such a directory or the checkpoint lacks
            tensors the model needs (``from_pretrained`` would initialise them
            randomly).
    """
    from transformers import AutoModelForCausalLM

    d = Path(path)
    if not d.is_dir() or not (d / "config.json").is_file():
        raise ValueError(f"MODEL must be a directory with config.json, got {str(path)!r}")
    if not any(d.glob("*.safetensors")):
        raise ValueError(f"MODEL: {str(path)!r} has no .safetensors weights")
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        d, use_safetensors=True, output_loading_info=True, dtype="auto"
    )
    model, info = loaded
    missing = list(info.get("missing_keys", []))
    if missing:
        raise ValueError(
            f"MODEL: the checkpoint {str(path)!r} lacks {len(missing)} tensors the model "
            f"needs: {sorted(missing)[:5]}"
        )
    return model


def write_checkpoint(model: Any, source: Path, out: Path, report: dict[str, Any]) -> None:
    """Write ``model`` and ``source``'s other files into ``out`` atomically.

    Raises:
        ValueError: If ``out`` exists.
    """
    if out.exists():
        raise ValueError(f"--out {str(out)!r} exists; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in source.iterdir():
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _REWRITTEN:
                if not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=2))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run(args: argparse.Namespace) -> int:
    """Load, prune, write; prints one line per pruned parameter count and a summary."""
    import time

    from fisherflow.apps import prune
    from fisherflow.matrices import load

    source, out = Path(args.model), Path(args.out)
    if out.exists():
        raise ValueError(f"--out {str(out)!r} exists; choose a new directory")
    model = load_checkpoint(source)
    fisher = load(args.fisher) if args.fisher is not None else None
    start = time.perf_counter()
    masks = prune(
        model,
        fisher,
        args.sparsity,
        pattern=args.pattern,
        method=args.method,
        scope=args.scope,
        params=args.params,
        damping=args.damping,
        rel_damping=args.rel_damping,
    )
    seconds = time.perf_counter() - start
    kept = {n: float(m.float().mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    report = {
        "source": str(source),
        "fisher": args.fisher,
        "method": args.method,
        "pattern": args.pattern,
        "scope": args.scope,
        "sparsity": pruned / total if total else 0.0,
        "damping": args.damping,
        "rel_damping": args.rel_damping,
        "seconds": seconds,
        "sparsity_per_parameter": {n: 1.0 - k for n, k in kept.items()},
    }
    write_checkpoint(model, source, out, report)
    print(
        f"wrote {out}: pruned {pruned} of {total} weights ({report['sparsity']:.1%}) in "
        f"{len(masks)} tensors with {args.method} ({args.pattern}) in {seconds:.2f} s"
    )
    return 0
