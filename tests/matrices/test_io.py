"""Files: exact round trip, metadata kept, and clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import fisherflow as ff

from .cases import LAYOUTS, STRUCTURE_NAMES, make


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_is_exact(tmp_path, structure, layout):
    F = make(structure, layout, kind="empirical", likelihood="gaussian", num_samples=12.5)
    path = tmp_path / "f.safetensors"
    F.save(path)
    G = ff.load(path)
    assert type(G) is type(F)
    assert (G.kind, G.likelihood, G.num_samples, G.layout) == (
        "empirical",
        "gaussian",
        12.5,
        F.layout,
    )
    (saved, extra), (loaded, extra2) = F._state(), G._state()
    assert extra == extra2 and saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    torch.testing.assert_close(G.to_dense(), F.to_dense(), atol=1e-14, rtol=1e-14)
    assert G.groups() == F.groups()


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    F = make("dense", "tiny")
    F.save(tmp_path / "f.safetensors")
    F.save(tmp_path / "f.safetensors")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "f.safetensors"
    make("dense", "tiny").save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fisherflow.matrices.io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        make("diagonal", "tiny").save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Fisher file"):
        ff.load(tmp_path / "nope.safetensors")


def test_corrupt_file(tmp_path):
    path = tmp_path / "f.safetensors"
    make("dense", "tiny").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        ff.load(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt"):
        ff.load(path)


def _rewrite(path, tensors, header):
    save_file(tensors, str(path), metadata={"fisherflow": json.dumps(header)} if header else None)


def _header_of(F):
    tensors, extra = F._state()
    return tensors, {
        "format_version": 1,
        "structure": F.structure,
        "kind": F.kind,
        "likelihood": F.likelihood,
        "num_samples": F.num_samples,
        "layout": F.layout.to_json(),
        "extra": extra,
    }


def test_file_without_metadata(tmp_path):
    path = tmp_path / "f.safetensors"
    _rewrite(path, {"x": torch.zeros(2)}, None)
    with pytest.raises(ValueError, match="not a fisherflow Fisher file"):
        ff.load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, h: h.pop("layout"), "missing \\['layout'\\]"),
        (lambda t, h: h.update(structure="sparse"), "unknown structure 'sparse'"),
        (lambda t, h: h.update(format_version=99), "format_version 99"),
        (lambda t, h: h.update(kind="guess"), "kind must be one of"),
        (lambda t, h: h.update(num_samples=-3), "num_samples must be finite and >= 0"),
        (lambda t, h: h.update(layout=[["w", [2, 2]]]), "do not match"),
        (lambda t, h: t.pop("matrix"), "do not match"),
        (lambda t, h: t.update(matrix=torch.zeros(3, 3, dtype=torch.float64)), "shape"),
    ],
)
def test_mismatched_metadata_and_tensors(tmp_path, change, message):
    tensors, header = _header_of(make("dense", "tiny"))
    tensors = dict(tensors)
    change(tensors, header)
    path = tmp_path / "f.safetensors"
    _rewrite(path, tensors, header)
    with pytest.raises(ValueError, match=message):
        ff.load(path)


def test_nan_tensor_in_file(tmp_path):
    tensors, header = _header_of(make("diagonal", "tiny"))
    values = tensors["values"].clone()
    values[0] = float("nan")
    path = tmp_path / "f.safetensors"
    _rewrite(path, {"values": values}, header)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ff.load(path)


def test_low_rank_file_with_non_orthonormal_factor(tmp_path):
    tensors, header = _header_of(make("lowrank", "tiny"))
    tensors = {**tensors, "U": 2 * tensors["U"]}
    path = tmp_path / "f.safetensors"
    _rewrite(path, tensors, header)
    with pytest.raises(ValueError, match="orthonormal"):
        ff.load(path)


def test_saved_file_has_the_usual_mode(tmp_path):
    import os

    mask = os.umask(0)
    os.umask(mask)
    path = tmp_path / "f.safetensors"
    make("dense", "tiny").save(path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
