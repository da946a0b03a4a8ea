"""The ``fisherflow merge`` configuration: read and checked before any work starts."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DTYPES", "MergeConfig", "ModelEntry", "parse_size", "read_config"]

#: Output dtypes by name.
DTYPES = ("float16", "bfloat16", "float32", "float64")

_TOP = {"models", "damping", "fallback", "dtype", "max_shard_size"}
_MODEL = {"model", "weight", "fisher"}
_ESTIMATE = {
    "data",
    "likelihood",
    "kind",
    "structure",
    "batch_size",
    "limit",
    "mc_samples",
    "rank",
    "seed",
}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


@dataclass
class ModelEntry:
    """One input: where the model is, its weight, and its Fisher (file or estimate)."""

    model: str
    weight: float = 1.0
    fisher_file: str | None = None
    estimate: dict[str, Any] | None = None


@dataclass
class MergeConfig:
    """A checked merge configuration."""

    models: list[ModelEntry]
    damping: float = 0.0
    fallback: str = "average"
    dtype: str | None = None
    max_shard_size: int = 2 * 10**9
    base: Path = field(default_factory=Path)


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as ``"500MB"``, ``"2GiB"``.

    Raises:
        ValueError: If the value is not a positive size.

    Example:
        >>> parse_size("2KB"), parse_size(100), parse_size("1.5 MiB")
        (2000, 100, 1572864)
    """
    if isinstance(value, bool):
        raise ValueError(f"max_shard_size must be a positive size, got {value!r}")
    if isinstance(value, numbers.Integral):
        size = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"max_shard_size must be bytes or a number with a unit {sorted(_UNITS)}, "
                f"got {value!r}"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {value!r}")
    return size


def _unknown(given: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        raise ValueError(f"{where}: unknown keys {extra}; allowed keys are {sorted(allowed)}")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where} must be a number, got {value!r}")
    return float(value)


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() or not (base / p).exists() else base / p)


def _model_entry(i: int, raw: object, base: Path) -> ModelEntry:
    where = f"models[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping with a 'model' key, got {raw!r}")
    _unknown(raw, _MODEL, where)
    if not isinstance(raw.get("model"), str):
        raise ValueError(f"{where}.model must be a directory or module:factory string")
    entry = ModelEntry(
        _resolve(raw["model"], base), _number(raw.get("weight", 1.0), f"{where}.weight")
    )
    fisher = raw.get("fisher")
    if isinstance(fisher, str):
        entry.fisher_file = _resolve(fisher, base)
        if not Path(entry.fisher_file).is_file():
            raise FileNotFoundError(f"{where}.fisher: no such file {entry.fisher_file}")
    elif isinstance(fisher, dict):
        _unknown(fisher, {"estimate"}, f"{where}.fisher")
        est = fisher.get("estimate")
        if not isinstance(est, dict) or "data" not in est:
            raise ValueError(f"{where}.fisher.estimate must be a mapping with a 'data' key")
        _unknown(est, _ESTIMATE, f"{where}.fisher.estimate")
        data = str(est["data"])
        entry.estimate = {**est, "data": data if data == "digits" else _resolve(data, base)}
    elif fisher is not None:
        raise ValueError(
            f"{where}.fisher must be a file path or {{estimate: {{...}}}}, got {fisher!r}"
        )
    return entry


def read_config(path: str | Path) -> MergeConfig:
    """Read and check a merge configuration (relative paths: from the file's folder).

    Raises:
        FileNotFoundError: If the file or a Fisher file it names is missing.
        ValueError: If a key is unknown or a value invalid (the message names it).
    """
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError("fisherflow merge needs PyYAML: pip install pyyaml") from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such merge configuration: {path}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the configuration must be a mapping, got {type(raw).__name__}")
    _unknown(raw, _TOP, str(path))
    models = raw.get("models")
    if not isinstance(models, list) or len(models) < 2:
        raise ValueError(f"{path}: 'models' must list at least two models")
    base = path.parent
    entries = [_model_entry(i, m, base) for i, m in enumerate(models)]
    has = [e.fisher_file is not None or e.estimate is not None for e in entries]
    if any(has) and not all(has):
        raise ValueError(
            f"{path}: give a fisher for every model or for none (plain average); "
            f"missing for models {[i for i, h in enumerate(has) if not h]}"
        )
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{path}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return MergeConfig(
        models=entries,
        damping=_number(raw.get("damping", 0.0), "damping"),
        fallback=str(raw.get("fallback", "average")),
        dtype=dtype,
        max_shard_size=parse_size(raw.get("max_shard_size", 2 * 10**9)),
        base=base,
    )
