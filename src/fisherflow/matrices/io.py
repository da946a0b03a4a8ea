"""Fisher files: safetensors tensors plus JSON metadata, written atomically.

Nothing is ever unpickled: a file holds raw tensors (safetensors) and a JSON
string under the metadata key ``"fisherflow"``. The structure named in the file is
resolved through :data:`fisherflow.matrices.STRUCTURES`, where every structure
registers itself, so this module imports neither the base class nor a structure.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fisherflow._version import __version__
from fisherflow.matrices.layout import ParamLayout
from fisherflow.matrices.registry import STRUCTURES

if TYPE_CHECKING:  # annotations only: the base class imports this module
    from fisherflow.matrices.base import FisherMatrix

__all__ = ["FORMAT_VERSION", "load", "save"]

#: Version of the on-disk format (bumped on incompatible changes).
FORMAT_VERSION = 1


def save(fisher: FisherMatrix, path: str | os.PathLike[str]) -> None:
    """Write a Fisher matrix to ``path`` (safetensors + JSON metadata), atomically.

    The file is written to a temporary name in the same directory and renamed, so a
    crash never leaves a half-written file under ``path``.

    Raises:
        TypeError: If ``fisher`` is not a :class:`FisherMatrix`.
    """
    if STRUCTURES.get(getattr(fisher, "structure", None)) is not type(fisher):  # type: ignore[arg-type]
        raise TypeError(
            f"fisher must be a FisherMatrix of a registered structure {sorted(STRUCTURES)}, "
            f"got {type(fisher).__name__}"
        )
    tensors, extra = fisher._state()
    header = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "structure": fisher.structure,
        "kind": fisher.kind,
        "likelihood": fisher.likelihood,
        "num_samples": fisher.num_samples,
        "layout": fisher.layout.to_json(),
        "extra": extra,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        payload = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
        save_file(payload, tmp, metadata={"fisherflow": json.dumps(header)})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0o600; give the usual file mode
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _header(path: Path, raw: dict[str, str] | None) -> dict[str, Any]:
    if not raw or "fisherflow" not in raw:
        raise ValueError(f"{path} is not a fisherflow Fisher file: no 'fisherflow' metadata")
    try:
        header = json.loads(raw["fisherflow"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata is not valid JSON ({err})") from err
    required = (
        "format_version",
        "structure",
        "kind",
        "likelihood",
        "num_samples",
        "layout",
        "extra",
    )
    missing = [k for k in required if not isinstance(header, dict) or k not in header]
    if missing:
        raise ValueError(f"{path}: metadata is missing {missing}")
    if header["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {header['format_version']!r} is not supported "
            f"(this fisherflow reads version {FORMAT_VERSION})"
        )
    if header["structure"] not in STRUCTURES:
        raise ValueError(
            f"{path}: unknown structure {header['structure']!r}; known: {sorted(STRUCTURES)}"
        )
    return header


def load(path: str | os.PathLike[str], device: str | None = None) -> FisherMatrix:
    """Read a Fisher matrix written by :func:`save` (or ``FisherMatrix.save``).

    Args:
        path: The ``.safetensors`` file.
        device: Optional device to load tensors onto (default CPU).

    Returns:
        The Fisher matrix with its structure, kind, likelihood, num_samples and layout.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is corrupt, is not a fisherflow file, or its metadata and
            tensors do not match (the message names the problem).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no Fisher file at {file}")
    try:
        with safe_open(str(file), framework="pt", device=device or "cpu") as handle:
            header = _header(file, handle.metadata())
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except SafetensorError as err:
        raise ValueError(f"{file} is corrupt or not a safetensors file: {err}") from err
    cls = STRUCTURES[header["structure"]]
    try:
        layout = ParamLayout.from_json(header["layout"])
        return cls._from_state(
            layout,
            tensors,
            header["extra"],
            num_samples=header["num_samples"],
            kind=header["kind"],
            likelihood=header["likelihood"],
        )
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{file}: tensors do not match the metadata ({err})") from err
