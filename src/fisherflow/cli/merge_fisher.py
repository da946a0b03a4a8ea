"""The Fishers of ``fisherflow merge``: diagonal, K-FAC and block files read unit by unit.

A diagonal Fisher file (:func:`fisherflow.matrices.save`) holds one flat tensor
``values`` in layout order, so the Fisher of one parameter is the slice
``values[layout.slice(name)]``, read with safetensors' ``get_slice`` when that
parameter is merged: the whole diagonal (as large as the model) is never in
memory. A K-FAC file holds the factors ``A.i`` and ``G.i`` of layer ``i`` (in the
order of the header's groups) and the diagonal ``rest`` of the parameters outside
the layers; a layer's unit reads its two factors, a rest parameter its slice of
``rest``, so at most one layer's factors are in memory. A block file holds one
dense block ``block.i`` per group, read when that group is merged. Dense and
low-rank Fishers couple every parameter (one merge unit), so they are held whole,
as are Fishers estimated during the merge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fisherflow.apps._params import check_alike
from fisherflow.apps.merging import check_layout_fits, merge_units, unit_fisher
from fisherflow.matrices import (
    KFAC,
    Block,
    Diagonal,
    FisherMatrix,
    KronGroup,
    ParamLayout,
    load,
)
from fisherflow.matrices.io import FORMAT_VERSION
from fisherflow.matrices.validate import check_partition, check_vector

__all__ = ["SAFETENSORS_DTYPES", "FisherSource", "check_fisher_sources"]

#: safetensors' dtype names (``get_slice(...).get_dtype()``) of floating tensors.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


#: Structures whose files are read unit by unit (their tensors' names in the file).
STREAMED = frozenset({"diagonal", "kfac", "block"})


class FisherSource:
    """One model's Fisher: a diagonal, K-FAC or block file read lazily, or a matrix held whole.

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
            header = self._streamed_header(self.path)
            if header is None:
                self._matrix = load(self.path)
            else:
                self._layout = ParamLayout.from_json(header["layout"])
                self._structure = str(header["structure"])
                self._handle = safe_open(str(self.path), framework="pt")
                if self._structure == "diagonal":
                    self._dtype = self._check_vector("values", self._layout.size)
                elif self._structure == "block":
                    self._open_block(header)
                else:
                    self._open_kfac(header)

    def _check_vector(self, key: str, size: int) -> torch.dtype:
        """Check a flat tensor's shape and dtype in the file (no data read)."""
        view = self._handle.get_slice(key)
        if tuple(view.get_shape()) != (size,):
            raise ValueError(
                f"{self.path}: {key} has shape {tuple(view.get_shape())}, the layout "
                f"needs {size} entries"
            )
        if view.get_dtype() not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: {key} has dtype {view.get_dtype()}")
        return SAFETENSORS_DTYPES[view.get_dtype()]

    def _open_kfac(self, header: dict[str, Any]) -> None:
        """Read a K-FAC file's groups and check its tensors' shapes (no data read)."""
        try:
            self._groups: dict[str, KronGroup] = KFAC._groups_from(header["extra"])
            dims = {g: spec.dims(self._layout) for g, spec in self._groups.items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: groups do not match the layout ({err})") from err
        self._meta = {k: header[k] for k in ("num_samples", "kind", "likelihood")}
        covered = {n for spec in self._groups.values() for n in spec.names}
        self._rest_layout = self._layout.subset([n for n in self._layout.names if n not in covered])
        self._dtype = self._check_vector("rest", self._rest_layout.size)
        self._factor_keys: dict[str, tuple[str, str]] = {}
        for i, (g, (n_out, n_cols)) in enumerate(dims.items()):
            for key, side in ((f"A.{i}", n_cols), (f"G.{i}", n_out)):
                shape = tuple(self._handle.get_slice(key).get_shape())
                if shape not in ((side,), (side, side)):
                    raise ValueError(
                        f"{self.path}: {key} (layer {g!r}) has shape {shape}, expected "
                        f"({side}, {side}) or ({side},)"
                    )
            self._factor_keys[g] = (f"A.{i}", f"G.{i}")

    def _open_block(self, header: dict[str, Any]) -> None:
        """Read a block file's groups and check its blocks' shapes (no data read)."""
        try:
            groups = {str(g): [str(n) for n in names] for g, names in header["extra"]["groups"]}
            check_partition(self._layout, groups)
            sizes = {g: self._layout.subset(names).size for g, names in groups.items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: groups do not match the layout ({err})") from err
        covered = {n for names in groups.values() for n in names}
        if covered != set(self._layout.names):
            raise ValueError(f"{self.path}: the blocks do not cover every parameter")
        self._meta = {k: header[k] for k in ("num_samples", "kind", "likelihood")}
        self._block_groups = groups
        self._block_keys = {g: f"block.{i}" for i, g in enumerate(groups)}
        dtypes = set()
        for g, key in self._block_keys.items():
            view = self._handle.get_slice(key)
            shape, size = tuple(view.get_shape()), sizes[g]
            if shape != (size, size):
                raise ValueError(
                    f"{self.path}: {key} (group {g!r}) has shape {shape}, expected ({size}, {size})"
                )
            if view.get_dtype() not in SAFETENSORS_DTYPES:
                raise ValueError(f"{self.path}: {key} has dtype {view.get_dtype()}")
            dtypes.add(SAFETENSORS_DTYPES[view.get_dtype()])
        self._dtype = max(dtypes, key=lambda t: torch.finfo(t).bits) if dtypes else torch.float32

    @staticmethod
    def _streamed_header(path: Path) -> dict[str, Any] | None:
        """The header of a diagonal or K-FAC Fisher of this format, else ``None``."""
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
            or header.get("structure") not in STREAMED
            or header.get("format_version") != FORMAT_VERSION
            or "layout" not in header
        ):
            return None
        if header["structure"] == "diagonal":
            return header if keys == {"values"} else None
        groups = (
            header.get("extra", {}).get("groups") if isinstance(header.get("extra"), dict) else None
        )
        if not isinstance(groups, list):
            return None
        if header["structure"] == "block":
            expected = {f"block.{i}" for i in range(len(groups))}
        else:
            expected = {"rest"} | {f"{s}.{i}" for i in range(len(groups)) for s in "AG"}
        if keys != expected or not all(k in header for k in ("num_samples", "kind", "likelihood")):
            return None
        return header

    @property
    def streamed(self) -> bool:
        """Whether the Fisher is read slice by slice from its file."""
        return self._handle is not None

    @property
    def structure(self) -> str:
        """The Fisher's structure name."""
        return self._structure if self._matrix is None else self._matrix.structure

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
        if self._matrix is not None:
            return dict(self._matrix.groups())
        if self._structure == "diagonal":
            return {}
        if self._structure == "block":
            return {g: list(names) for g, names in self._block_groups.items()}
        return {g: spec.names for g, spec in self._groups.items()}

    def units(self) -> dict[str, list[str]]:
        """:func:`fisherflow.apps.merge_units` of this Fisher."""
        if self._matrix is not None:
            return merge_units(self._matrix)
        units = {g: list(names) for g, names in self.groups().items()}
        covered = {n for names in units.values() for n in names}
        units.update({n: [n] for n in self._layout.names if n not in covered})
        return units

    def unit_bytes(self, unit: str, names: list[str]) -> int:
        """Bytes of the Fisher over one merge unit as stored (no data read from a file).

        Example:
            >>> from fisherflow.matrices import ParamLayout
            >>> lay = ParamLayout.from_shapes({"w": (2, 3)})
            >>> F = KFAC({"l": KronGroup("w")}, {"l": torch.eye(3)}, {"l": torch.eye(2)}, lay)
            >>> FisherSource(F).unit_bytes("l", ["w"])  # (3² + 2²) float32 entries
            52
        """
        if self._matrix is not None:
            tensors = unit_fisher(self._matrix, unit, names)._state()[0].values()
            return sum(t.numel() * t.element_size() for t in tensors)
        size = self._layout.subset(names).size
        if self._structure == "block":
            return size * size * self._dtype.itemsize
        if self._structure == "kfac" and unit in self._groups:
            return sum(
                math.prod(self._handle.get_slice(k).get_shape()) * self._dtype.itemsize
                for k in self._factor_keys[unit]
            )
        return size * self._dtype.itemsize

    def separable(self, unit: str, names: list[str]) -> bool:
        """Whether the unit is one parameter whose Fisher is a diagonal (:meth:`diagonal`).

        True for every parameter of a diagonal Fisher and for the parameters outside
        the layers of a K-FAC or EKFAC one.
        """
        if len(names) != 1 or unit != names[0] or unit in self.groups():
            return False
        return self.structure in ("diagonal", "kfac", "ekfac")

    def diagonal(self, name: str) -> Tensor:
        """The Fisher diagonal over one parameter, flat (read from the file now).

        For a K-FAC or EKFAC Fisher, ``name`` must be a parameter outside the layers.
        """
        if self._matrix is None:
            key, lay = (
                ("values", self._layout)
                if self._structure == "diagonal"
                else ("rest", self._rest_layout)
            )
            where = lay.slice(name)
            values = self._handle.get_slice(key)[where.start : where.stop]
            return check_vector(values, where.stop - where.start, f"{self.path} {key}[{name}]")
        block = unit_fisher(self._matrix, name, [name])
        if not isinstance(block, Diagonal):
            raise ValueError(f"the Fisher over {name!r} is not a diagonal")
        return block.values

    def unit(self, unit: str, names: list[str]) -> FisherMatrix:
        """The Fisher over one merge unit (:func:`fisherflow.apps.unit_fisher`)."""
        if self._matrix is None and self._structure == "block":
            block = self._handle.get_tensor(self._block_keys[unit])
            groups = {unit: self._block_groups[unit]}
            return Block({unit: block}, groups, self._layout.subset(groups[unit]), **self._meta)
        if self._matrix is None and self._structure == "kfac" and unit in self._groups:
            spec = self._groups[unit]
            a_key, g_key = self._factor_keys[unit]
            factors = {k: self._handle.get_tensor(k) for k in (a_key, g_key)}
            return KFAC(
                {unit: spec},
                {unit: factors[a_key]},
                {unit: factors[g_key]},
                self._layout.subset(spec.names),
                None,
                **self._meta,
            )
        if self._matrix is None:
            parts = [self.diagonal(n) for n in names]
            meta = self._meta if self._structure == "kfac" else {}
            return Diagonal(torch.cat(parts), self._layout.subset(names), **meta)
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
