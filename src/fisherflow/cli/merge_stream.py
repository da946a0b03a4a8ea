"""The streaming merge behind ``fisherflow merge``: checkpoints read tensor by tensor.

Tensors are read from the inputs' safetensors shards with ``safe_open`` as each
merge unit (a layer's tensors under a K-FAC or block Fisher, one tensor under a
diagonal one, everything under dense or low-rank) is merged and dropped after it,
and an output shard is written as soon as it is full.

* Diagonal Fishers from files are read the same way, one parameter's slice at a
  time (:class:`fisherflow.cli.merge_fisher.FisherSource`), and each tensor is
  merged in place (:func:`fisherflow.apps._diagonal.merge_diagonal_inplace`): the
  peak is the output shard being filled plus about five tensors of the largest
  parameter's size (three running sums, a copy of one input tensor and of one
  Fisher slice; the tensors read stay in the files' mapped pages),
  whatever the number of models.
  The parameters outside the layers of a K-FAC Fisher (a diagonal there: layer
  norms, and a token embedding tied to the output layer) take the same path.
* Other units merge with :func:`fisherflow.apps.merge_block`. K-FAC files are read
  one layer's factors at a time, and a layer's damped solve runs in a fixed set of
  buffers on the layer's matrix view (:mod:`fisherflow.apps._kron_cg`); block files
  one group's block at a time. Dense and low-rank Fishers (one unit over every
  parameter), and Fishers estimated during the merge, are held whole.
* Units are merged largest Fisher first, so the heaviest arithmetic meets the
  emptiest output shard; a shard that the next unit's output would overflow is
  written before the unit is merged, not after; and large temporaries go back to
  the operating system as they are freed (:mod:`fisherflow.cli.merge_memory`).

Either way the result equals :func:`fisherflow.apps.merge` on the whole models
(bitwise for diagonal Fishers and K-FAC's parameters outside the layers).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fisherflow.apps._diagonal import merge_diagonal_inplace
from fisherflow.apps.merging import check_inputs, check_weights, fallback_tensor, merge_block
from fisherflow.cli.merge_config import MergeConfig, ModelEntry, read_config
from fisherflow.cli.merge_fisher import SAFETENSORS_DTYPES, FisherSource, check_fisher_sources
from fisherflow.cli.merge_memory import map_large_blocks, release_freed_memory

__all__ = [
    "ShardWriter",
    "Source",
    "merge_config",
    "read_tensor",
]

_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


class _Shape:
    """A tensor's shape without its data (for the layout checks)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


class Source:
    """One input checkpoint: a Hugging Face directory read lazily, or an in-memory model.

    Args:
        spec: A directory holding ``model.safetensors`` (or sharded with
            ``model.safetensors.index.json``), or ``module:factory``.

    Raises:
        FileNotFoundError: If a directory has no safetensors weights.
        ValueError: If the index names a missing shard or a shard lacks a tensor.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.directory: Path | None = None
        self._tensors: dict[str, Tensor] | None = None
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        path = Path(spec)
        if path.is_dir():
            self.directory = path
            index = path / _WEIGHT_FILES[0]
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                self._files = {k: path / f for k, f in weight_map.items()}
            elif (path / _WEIGHT_FILES[1]).is_file():
                with safe_open(path / _WEIGHT_FILES[1], "pt") as f:
                    self._files = {k: path / _WEIGHT_FILES[1] for k in f.keys()}
            else:
                raise FileNotFoundError(f"{spec} holds no model.safetensors (or its index)")
            self.shapes = {}
            self.dtypes: dict[str, torch.dtype] = {}
            for f in sorted(set(self._files.values())):
                if not f.is_file():
                    raise ValueError(f"{spec}: the index names a missing shard {f.name}")
                handle = self._handle(f)
                present = set(handle.keys())
                for k in [k for k, g in self._files.items() if g == f]:
                    if k not in present:
                        raise ValueError(f"{spec}: tensor {k!r} is missing from {f.name}")
                    view = handle.get_slice(k)
                    self.shapes[k] = _Shape(tuple(view.get_shape()))
                    self.dtypes[k] = SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32)
        else:
            from fisherflow.cli.estimate import load_model

            self._tensors = dict(load_model(spec).state_dict())
            self.shapes = {k: _Shape(tuple(t.shape)) for k, t in self._tensors.items()}
            self.dtypes = {k: t.dtype for k, t in self._tensors.items()}

    def _handle(self, f: Path) -> Any:
        if f not in self._handles:
            self._handles[f] = safe_open(f, "pt")
        return self._handles[f]

    def keys(self) -> list[str]:
        """Tensor names in checkpoint order."""
        return list(self.shapes)

    def close(self) -> None:
        """Drop open shard handles."""
        self._handles.clear()

    def get(self, key: str) -> Tensor:
        """One tensor (read from its shard now)."""
        return read_tensor(self, key)


def read_tensor(source: Source, key: str) -> Tensor:
    """Read one tensor of a source (the one place inputs are read: tests count it)."""
    if source._tensors is not None:
        return source._tensors[key].detach()
    return source._handle(source._files[key]).get_tensor(key)


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (one shard in memory).

    Args:
        folder: Where the shards go.
        max_bytes: Largest shard (a single larger tensor gets a shard of its own).
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self._buffer: dict[str, Tensor] = {}
        self._bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.peak_buffer_bytes = 0

    def add(self, name: str, tensor: Tensor, owned: bool = False) -> None:
        """Queue a tensor, writing the current shard first if it would overflow.

        ``owned``: the tensor is contiguous, shares no storage and nobody else holds
        it, so it is queued as it is rather than copied.
        """
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._bytes + size > self.max_bytes:
            self.flush()
        self._buffer[name] = tensor.detach() if owned else tensor.detach().contiguous().clone()
        self._bytes += size
        self.total_bytes += size
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._bytes)

    def make_room(self, size: int) -> bool:
        """Write the current shard now if ``size`` more bytes would overflow it.

        Called before a unit is merged, so that a shard :meth:`add` would write
        anyway is not held through the unit's arithmetic. Returns whether it wrote.
        """
        if self._buffer and self._bytes + size > self.max_bytes:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Write the queued tensors as one shard."""
        if not self._buffer:
            return
        path = self.folder / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self._buffer)))
        self._buffer, self._bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and name the shards as ``from_pretrained`` expects."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, (path, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / _WEIGHT_FILES[0]).write_text(json.dumps(index, indent=2) + "\n")
        return names


def _fisher(entry: ModelEntry, progress: bool) -> FisherSource | None:
    if entry.fisher_file is not None:
        return FisherSource(entry.fisher_file)
    if entry.estimate is None:
        return None
    from fisherflow.cli.estimate import load_data, load_model
    from fisherflow.estimation import estimate

    opts = dict(entry.estimate)
    data = load_data(opts.pop("data"), int(opts.pop("batch_size", 8)), opts.pop("limit", None))
    model = load_model(entry.model)
    return FisherSource(
        estimate(
            model,
            data,
            opts.pop("likelihood", "categorical"),
            opts.pop("kind", "mc"),
            opts.pop("structure", "diagonal"),
            mc_samples=int(opts.pop("mc_samples", 1)),
            rank=int(opts.pop("rank", 10)),
            seed=opts.pop("seed", 0),
            progress=progress,
        )
    )


def _copy_side_files(source: Source, folder: Path, dtype: str | None) -> list[str]:
    """Copy config, generation and tokenizer files; set the config's dtype if asked."""
    if source.directory is None:
        return []
    copied = []
    for f in sorted(source.directory.iterdir()):
        if not f.is_file() or f.name.endswith(_SKIP_SUFFIXES) or f.name == _WEIGHT_FILES[0]:
            continue
        shutil.copy2(f, folder / f.name)
        copied.append(f.name)
    config = folder / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = dtype
        config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed onto it on success, removed on failure."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report(
    config: MergeConfig, units: list[dict[str, Any]], extra: dict[str, Any]
) -> tuple[str, str]:
    n = len(config.models)
    totals = [sum(u["mass"][i] for u in units) for i in range(n)]
    report = {
        "models": [{"model": e.model, "weight": e.weight} for e in config.models],
        "damping": config.damping,
        "fallback": config.fallback,
        "fisher_mass_per_model": totals,
        "units": units,
        **extra,
    }
    lines = [
        "# fisherflow merge report",
        "",
        f"{n} models, damping {config.damping:g}, fallback {config.fallback!r}, "
        f"{len(units)} Fisher-merged units, {extra['fallback_tensors']} tensors by fallback.",
        "",
        "| model | weight | Fisher mass w·tr F |",
        "|---|---|---|",
        *[
            f"| {e.model} | {e.weight:g} | {t:.6g} |"
            for e, t in zip(config.models, totals, strict=True)
        ],
        "",
        "Per unit: each model's share of the Fisher mass (its effective weight there).",
        "",
        "| unit | " + " | ".join(f"model {i}" for i in range(n)) + " |",
        "|---|" + "---|" * n,
        *[f"| {u['unit']} | " + " | ".join(f"{s:.3f}" for s in u["share"]) + " |" for u in units],
    ]
    return json.dumps(report, indent=2) + "\n", "\n".join(lines) + "\n"


def merge_config(config_path: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Run a merge configuration into ``out`` (atomically: all or nothing).

    Returns:
        The output directory.

    Raises:
        ValueError: On a bad configuration, checkpoints whose tensors differ, Fishers
            that do not fit the checkpoints, or an ``out`` that is not empty.
        FileNotFoundError: If an input is missing.
    """
    config = read_config(config_path)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    weights = check_weights([e.weight for e in config.models], len(config.models))
    sources = [Source(e.model) for e in config.models]
    check_inputs([s.shapes for s in sources], [], what="checkpoints")
    fishers = [_fisher(e, progress) for e in config.models]
    fishers_given = [F for F in fishers if F is not None]
    if fishers_given:
        check_fisher_sources(sources[0].shapes, fishers_given)
    dtype = getattr(torch, config.dtype) if config.dtype else None
    map_large_blocks()
    units_done: list[dict[str, Any]] = []
    total = sum(weights)
    normalised = [w / total for w in weights]
    with _staging(out) as tmp:
        writer = ShardWriter(tmp, config.max_shard_size)
        units = fishers_given[0].units() if fishers_given else {}
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sources[0].keys()), desc="merge", unit="tensor", disable=not progress)

        def out_bytes(names: list[str]) -> int:
            sizes = [(dtype or sources[0].dtypes[n]).itemsize for n in names]
            return sum(
                math.prod(sources[0].shapes[n].shape) * b for n, b in zip(names, sizes, strict=True)
            )

        # the units with the largest Fishers first, while the output shard is emptiest
        # (their working sets are the largest); the shards' contents follow this order
        order = sorted(
            units.items(),
            key=lambda item: -sum(F.unit_bytes(item[0], item[1]) for F in fishers_given),
        )
        for unit, names in order:
            if writer.make_room(out_bytes(names)):
                release_freed_memory()
            if all(F.separable(unit, names) for F in fishers_given):
                masses = _merge_diagonal(names[0], sources, fishers_given, weights, config, writer)
            else:
                thetas = [{n: read_tensor(s, n) for n in names} for s in sources]
                sub = [F.unit(unit, names) for F in fishers_given]
                merged, masses = merge_block(thetas, sub, weights, config.damping)
                like = {n: thetas[0][n].dtype for n in names}
                del thetas, sub
                for n in names:
                    writer.add(n, merged[n].to(dtype or like[n]))
                del merged
            mass = sum(masses)
            share = [m / mass if mass > 0 else w for m, w in zip(masses, normalised, strict=True)]
            units_done.append({"unit": unit, "parameters": names, "mass": masses, "share": share})
            bar.update(len(names))
            release_freed_memory()
        covered = {n for names in units.values() for n in names}
        rest = [k for k in sources[0].keys() if k not in covered]
        for key in rest:
            writer.make_room(out_bytes([key]))
            tensors = [read_tensor(s, key) for s in sources]
            t = fallback_tensor(tensors, normalised, key, config.fallback)
            del tensors
            writer.add(key, t.to(dtype) if dtype and t.dtype.is_floating_point else t)
            del t
            bar.update(1)
        bar.close()
        shards = writer.close()
        copied = _copy_side_files(sources[0], tmp, config.dtype)
        extra = {
            "fallback_tensors": len(rest),
            "shards": shards,
            "copied_files": copied,
            "largest_shard_bytes": writer.peak_buffer_bytes,
        }
        text, md = _report(config, units_done, extra)
        (tmp / "merge_report.json").write_text(text)
        (tmp / "merge_report.md").write_text(md)
        for s in sources:
            s.close()
        for F in fishers_given:
            F.close()
    return out


def _merge_diagonal(
    name: str,
    sources: list[Source],
    fishers: list[FisherSource],
    weights: list[float],
    config: MergeConfig,
    writer: ShardWriter,
) -> list[float]:
    """Merge one tensor under diagonal Fishers in place and queue it; the masses."""
    dtype = torch.float32
    for t in [F.dtype for F in fishers] + [s.dtypes[name] for s in sources]:
        dtype = torch.promote_types(dtype, t)
    flat, masses = merge_diagonal_inplace(
        lambda i: read_tensor(sources[i], name),
        lambda i: fishers[i].diagonal(name),
        weights,
        config.damping,
        dtype,
    )
    out_dtype = getattr(torch, config.dtype) if config.dtype else sources[0].dtypes[name]
    merged = flat.view(sources[0].shapes[name].shape).to(out_dtype)
    del flat
    writer.add(name, merged, owned=True)
    return masses
