"""``fisherflow estimate``: a model and data in, a ``.safetensors`` Fisher out.

torch is imported inside the functions that need it, never at module level, so that
``fisherflow --help`` stays fast (see :mod:`fisherflow.cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fisherflow.cli.args import HelpFormatter, positive_int

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["KINDS", "LIKELIHOODS", "STRUCTURES", "load_data", "load_model", "register", "run"]

#: Names ``--kind``, ``--likelihood`` and ``--structure`` offer in ``--help``. They
#: mirror the library's registries (tests/cli checks) without importing torch; a
#: likelihood or structure that the ``--model`` module registers is accepted too.
KINDS = ("exact", "mc", "empirical")
LIKELIHOODS = ("categorical", "bernoulli", "gaussian", "poisson")
STRUCTURES = ("dense", "diagonal", "block", "kfac", "ekfac", "lowrank")


def register(subparsers: Any) -> None:
    """Add the ``estimate`` subcommand."""
    p = subparsers.add_parser(
        "estimate",
        help="estimate a model's Fisher and save it",
        description="Estimate the Fisher information of a model on data and save it as "
        ".safetensors (load it with fisherflow.load). The same call as ff.estimate: "
        "the kind is always named (--kind has no default, as in ff.estimate).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="module:factory, a callable returning an nn.Module (a module file in the "
        "current directory is found, as with python -m), or a local Hugging Face model "
        "directory",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn, bundled) or a .npz/.safetensors file with 'inputs' "
        "and 'targets' (or 'input_ids' for causal LMs); floating arrays are cast to the "
        "model's dtype",
    )
    p.add_argument(
        "--likelihood",
        default="categorical",
        metavar="NAME",
        help=f"one of {', '.join(LIKELIHOODS)}, or a name the --model module registers",
    )
    p.add_argument(
        "--kind",
        required=True,
        choices=KINDS,
        help="exact: the model's predictive distribution in closed form; mc: labels "
        "sampled from the model; empirical: the observed labels",
    )
    p.add_argument(
        "--structure",
        default="diagonal",
        metavar="NAME",
        help=f"one of {', '.join(STRUCTURES)}",
    )
    p.add_argument(
        "--mc-samples", type=positive_int, default=1, help="sampled labels per input (mc)"
    )
    p.add_argument("--rank", type=positive_int, default=10, help="rank of 'lowrank'")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per batch")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="use only the first N rows (default: all)"
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[str]:
    """The current directory first on ``sys.path`` meanwhile, as ``python -m`` puts it."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield cwd
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_factory(spec: str, cwd: str) -> Any:
    """The callable named by ``module:attr``."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"--model must be module:factory or a directory, got {spec!r}")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (mod_name + ".").startswith(err.name + "."):
            raise ValueError(
                f"--model {spec}: no module named {err.name!r} (looked in the current "
                f"directory {cwd} and on sys.path)"
            ) from err
        raise ValueError(f"--model {spec}: importing {mod_name!r} failed: {err}") from err
    except Exception as err:  # the user's module raised while importing
        raise ValueError(
            f"--model {spec}: importing {mod_name!r} failed: {type(err).__name__}: {err}"
        ) from err
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(
            f"--model {spec}: module {mod_name!r} has no attribute {attr!r}; its callables: {names}"
        )
    factory = getattr(module, attr)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {attr!r} is a {type(factory).__name__}, not callable")
    return factory


def load_model(spec: str) -> nn.Module:
    """A model from ``module:factory`` or a local Hugging Face directory.

    Args:
        spec: ``module:factory`` (the module is looked up in the current directory
            first, as ``python -m`` does) or a directory.

    Returns:
        The model.

    Raises:
        ValueError: If ``spec`` is neither, the module cannot be imported, lacks the
            attribute, the factory raises or returns something other than an
            ``nn.Module``.
    """
    from torch import nn

    path = Path(spec)
    if path.is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path)  # type: ignore[no-any-return]
    with _cwd_on_path() as cwd:
        factory = _import_factory(spec, cwd)
        try:
            model = factory()
        except Exception as err:
            raise ValueError(
                f"--model {spec}: calling it raised {type(err).__name__}: {err}"
            ) from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} must return an nn.Module, got {type(model).__name__}")
    return model


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def load_data(
    spec: str, batch_size: int, limit: int | None = None, dtype: torch.dtype | None = None
) -> list[Any]:
    """Batches from ``'digits'`` or a ``.npz``/``.safetensors`` file (never unpickled).

    Args:
        spec: ``'digits'`` or a file path.
        batch_size: Rows per batch.
        limit: Use only the first ``limit`` rows.
        dtype: Floating dtype to cast floating arrays to (the model's); ``None`` keeps
            them as stored.

    Returns:
        A list of ``(inputs, targets)`` batches, or ``{"input_ids", "labels"}`` dicts.

    Raises:
        ValueError: If the source is unknown, unreadable or lacks the expected arrays.
    """
    import torch

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

        try:
            with np.load(spec, allow_pickle=False) as f:
                arrays = {k: torch.from_numpy(f[k]) for k in f.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"--data {spec}: cannot read it as .npz: {err}") from err
    else:
        raise ValueError(f"--data must be 'digits', a .npz or a .safetensors file, got {spec!r}")
    if not arrays:
        raise ValueError(f"--data {spec}: the file holds no arrays")
    if dtype is not None:
        arrays = {k: v.to(dtype) if v.is_floating_point() else v for k, v in arrays.items()}
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


def _check_forward(model: nn.Module, batch: Any, spec: str) -> None:
    """Run the model on the first batch; a failure is the user's model or data."""
    import torch

    inputs = batch if isinstance(batch, dict) else batch[0]
    try:
        with torch.no_grad():
            if isinstance(inputs, dict):
                model(input_ids=inputs["input_ids"])
            else:
                model(inputs)
    except Exception as err:
        shape = tuple(inputs["input_ids"].shape if isinstance(inputs, dict) else inputs.shape)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"the model from --model {spec} fails on the first batch of --data "
            f"(inputs of shape {shape}): {type(err).__name__}: {first}"
        ) from err


def run(args: argparse.Namespace) -> int:
    """Estimate and save; prints a one-line summary."""
    from fisherflow.estimation import estimate

    model = load_model(args.model)
    data = load_data(args.data, args.batch_size, args.limit, dtype=_model_dtype(model))
    if not data:
        raise ValueError(f"--data {args.data}: no rows")
    _check_forward(model, data[0], args.model)
    F = estimate(
        model,
        data,
        args.likelihood,
        args.kind,
        args.structure,
        mc_samples=args.mc_samples,
        rank=args.rank,
        progress=not getattr(args, "no_progress", False),
    )
    F.save(args.out)
    print(f"wrote {args.out}: {F!r}, trace {float(F.trace()):.6g}")
    return 0
