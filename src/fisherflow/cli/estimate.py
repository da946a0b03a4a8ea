"""``fisherflow estimate``: a model and data in, a ``.safetensors`` Fisher out."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_data", "load_model", "register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``estimate`` subcommand."""
    p = subparsers.add_parser("estimate", help="estimate a model's Fisher and save it")
    p.add_argument(
        "--model",
        required=True,
        help="module:factory (a callable returning an nn.Module) or a local "
        "Hugging Face model directory",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn, bundled) or a .safetensors/.pt-free .npz file "
        "with 'inputs' and 'targets' (or 'input_ids' for causal LMs)",
    )
    p.add_argument("--likelihood", default="categorical")
    p.add_argument("--kind", default="mc", choices=["exact", "mc", "empirical"])
    p.add_argument("--structure", default="diagonal")
    p.add_argument("--mc-samples", type=int, default=1)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=run)


def load_model(spec: str) -> nn.Module:
    """A model from ``module:factory`` or a local Hugging Face directory.

    Raises:
        ValueError: If ``spec`` is neither.
    """
    path = Path(spec)
    if path.is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path)  # type: ignore[no-any-return]
    if ":" not in spec:
        raise ValueError(f"--model must be module:factory or a directory, got {spec!r}")
    mod, _, attr = spec.partition(":")
    model = getattr(importlib.import_module(mod), attr)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} must return an nn.Module, got {type(model).__name__}")
    return model


def load_data(spec: str, batch_size: int, limit: int | None = None) -> list[Any]:
    """Batches from ``'digits'`` or a ``.npz``/``.safetensors`` file (never unpickled).

    Raises:
        ValueError: If the source is unknown or lacks the expected arrays.
    """
    if spec == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        arrays = {
            "inputs": torch.tensor(d.data / 16.0, dtype=torch.float32),
            "targets": torch.tensor(d.target),
        }
    elif spec.endswith(".safetensors"):
        from safetensors.torch import load_file

        arrays = load_file(spec)
    elif spec.endswith(".npz"):
        import numpy as np

        with np.load(spec, allow_pickle=False) as f:
            arrays = {k: torch.from_numpy(f[k]) for k in f.files}
    else:
        raise ValueError(f"--data must be 'digits', a .npz or a .safetensors file, got {spec!r}")
    n = len(next(iter(arrays.values())))
    n = n if limit is None else min(n, limit)
    arrays = {k: v[:n] for k, v in arrays.items()}
    if "input_ids" in arrays:
        ids = arrays["input_ids"].long()
        return [
            {"input_ids": ids[i : i + batch_size], "labels": ids[i : i + batch_size]}
            for i in range(0, n, batch_size)
        ]
    if "inputs" not in arrays or "targets" not in arrays:
        raise ValueError(f"data file needs 'inputs' and 'targets' arrays, got {sorted(arrays)}")
    x, y = arrays["inputs"], arrays["targets"]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def run(args: argparse.Namespace) -> int:
    """Estimate and save; prints a one-line summary."""
    from fisherflow.estimation import estimate

    model = load_model(args.model)
    data = load_data(args.data, args.batch_size, args.limit)
    F = estimate(
        model,
        data,
        args.likelihood,
        args.kind,
        args.structure,
        mc_samples=args.mc_samples,
        rank=args.rank,
    )
    F.save(args.out)
    print(f"wrote {args.out}: {F!r}, trace {float(F.trace()):.6g}")
    return 0
