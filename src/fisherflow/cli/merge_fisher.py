"""The Fishers of ``fisherflow merge``: a diagonal Fisher file read slice by slice.

A diagonal Fisher file (:func:`fisherflow.matrices.save`) holds one flat tensor
``values`` in layout order, so the Fisher of one parameter is the slice
``values[layout.slice(name)]``, read with safetensors' ``get_slice`` when that
parameter is merged: the whole diagonal (as large as the model) is never in
memory. Other structures, and Fishers estimated during the merge, are held whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fisherflow.apps._params import check_alike
from fisherflow.apps.merging import check_layout_fits, merge_units, unit_fisher
from fisherflow.matrices import Diagonal, FisherMatrix, ParamLayout, load
from fisherflow.matrices.io import FORMAT_VERSION
from fisherflow.matrices.validate import check_vector

__all__ = ["SAFETENSORS_DTYPES", "FisherSource", "check_fisher_sources"]

#: safetensors' dtype names (``get_slice(...).get_dtype()``) of floating tensors.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class FisherSource:
    """One model's Fisher: a diagonal file read lazily, or a matrix held whole.

    Args:
        fisher: A Fisher matrix, or the path of a Fisher file.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a valid fisherflow Fisher file.
    """

    def __init__(self, fisher: FisherMatrix | str | Path) -> None:
        self.path: Path | None = None
        self._matrix: FisherMatrix | None = None
        self._handle: Any = None
        if isinstance(fisher, FisherMatrix):
            self._matrix = fisher
        else:
            self.path = Path(fisher)
            header = self._diagonal_header(self.path)
            if header is None:
                self._matrix = load(self.path)
            else:
                self._layout = ParamLayout.from_json(header["layout"])
                self._handle = safe_open(str(self.path), framework="pt")
                values = self._handle.get_slice("values")
                if tuple(values.get_shape()) != (self._layout.size,):
                    raise ValueError(
                        f"{self.path}: values has shape {tuple(values.get_shape())}, the "
                        f"layout has {self._layout.size} entries"
                    )
                if values.get_dtype() not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{self.path}: values has dtype {values.get_dtype()}")
                self._dtype = SAFETENSORS_DTYPES[values.get_dtype()]

    @staticmethod
    def _diagonal_header(path: Path) -> dict[str, Any] | None:
        """The file's header if it is a diagonal Fisher of this format, else ``None``."""
        if not path.is_file():
            raise FileNotFoundError(f"no Fisher file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = handle.metadata() or {}
                keys = set(handle.keys())
            header = json.loads(raw.get("fisherflow", "null"))
        except (SafetensorError, json.JSONDecodeError):
            return None  # load() names the problem
        if (
            not isinstance(header, dict)
            or header.get("structure") != "diagonal"
            or header.get("format_version") != FORMAT_VERSION
            or "layout" not in header
            or keys != {"values"}
        ):
            return None
        return header

    @property
    def streamed(self) -> bool:
        """Whether the Fisher is read slice by slice from its file."""
        return self._handle is not None

    @property
    def structure(self) -> str:
        """The Fisher's structure name."""
        return "diagonal" if self._matrix is None else self._matrix.structure

    @property
    def layout(self) -> ParamLayout:
        """The Fisher's parameter layout."""
        return self._layout if self._matrix is None else self._matrix.layout

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the Fisher's tensors."""
        return self._dtype if self._matrix is None else self._matrix.dtype

    def groups(self) -> dict[str, list[str]]:
        """The Fisher's layer groups (none for a diagonal)."""
        return {} if self._matrix is None else dict(self._matrix.groups())

    def units(self) -> dict[str, list[str]]:
        """:func:`fisherflow.apps.merge_units` of this Fisher."""
        if self._matrix is None:
            return {n: [n] for n in self._layout.names}
        return merge_units(self._matrix)

    def diagonal(self, name: str) -> Tensor:
        """The Fisher diagonal over one parameter, flat (read from the file now)."""
        if self._matrix is None:
            where = self._layout.slice(name)
            values = self._handle.get_slice("values")[where.start : where.stop]
            return check_vector(values, where.stop - where.start, f"{self.path} values[{name}]")
        assert isinstance(self._matrix, Diagonal)
        return self._matrix.values[self._matrix.layout.slice(name)]

    def unit(self, unit: str, names: list[str]) -> FisherMatrix:
        """The Fisher over one merge unit (:func:`fisherflow.apps.unit_fisher`)."""
        if self._matrix is None:
            parts = [self.diagonal(n) for n in names]
            return Diagonal(torch.cat(parts), self._layout.subset(names))
        return unit_fisher(self._matrix, unit, names)

    def close(self) -> None:
        """Drop the open file handle."""
        self._handle = None


def check_fisher_sources(first: dict[str, Any], fishers: list[FisherSource]) -> None:
    """Check that the Fishers share a structure, layout and groups that fit the models.

    Args:
        first: The first checkpoint's name → anything with ``.shape``.
        fishers: The Fishers.

    Raises:
        ValueError: If the structures, layouts or groups differ, or the layout names a
            tensor the checkpoints lack or gives it another shape.
    """
    check_alike(fishers, "fishers")
    check_layout_fits(first, fishers[0].layout, "checkpoints")
