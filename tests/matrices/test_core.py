"""A structure written against the 3-member abstract core gets every operation right."""

from __future__ import annotations

import pytest
import torch

from fisherflow.matrices import STRUCTURES, Dense, FisherMatrix, ParamLayout

from .cases import DT, make, spd


class Symmetric(FisherMatrix, register=False):
    """A test structure: a full matrix, implementing only the abstract core."""

    structure = "symmetric"

    def __init__(self, matrix, layout, **meta):
        super().__init__(layout, **meta)
        self.matrix = matrix

    def _matmat(self, v):
        return self.matrix @ v

    def _state(self):
        return {"matrix": self.matrix}, {}

    @classmethod
    def _from_state(cls, layout, tensors, extra, **meta):
        return cls(tensors["matrix"], layout, **meta)


def test_abstract_core_has_three_members():
    assert FisherMatrix.__abstractmethods__ == {"_matmat", "_state", "_from_state"}
    assert "3 abstract members" in FisherMatrix.__doc__
    assert "symmetric" not in STRUCTURES  # register=False


def test_defaults_agree_with_dense():
    gen = torch.Generator().manual_seed(0)
    layout = ParamLayout.from_shapes({"a": (3,), "b": (2, 2)})
    M = spd(layout.size, gen)
    F, D = Symmetric(M, layout, num_samples=4.0), Dense(M, layout, num_samples=4.0)
    v = torch.randn(layout.size, 2, generator=gen, dtype=DT)
    assert F.dtype == DT and F.device == M.device
    torch.testing.assert_close(F.diagonal(), D.diagonal())
    torch.testing.assert_close(F.eigvalsh(), D.eigvalsh())
    torch.testing.assert_close(F.solve(v, damping=0.1), D.solve(v, damping=0.1))
    torch.testing.assert_close(
        F.power(-0.5, damping=0.0).to_dense(), D.power(-0.5, damping=0.0).to_dense()
    )
    torch.testing.assert_close(F.pinv_solve(v), D.pinv_solve(v))
    assert F.rank() == D.rank() == layout.size
    torch.testing.assert_close(F.logdet(0.2), D.logdet(0.2))
    torch.testing.assert_close((F + F).to_dense(), 2 * M)
    assert (F + F).num_samples == 8.0 and isinstance(F + F, Symmetric)
    torch.testing.assert_close((0.5 * F).to_dense(), 0.5 * M)
    torch.testing.assert_close(F.block("b").to_dense(), D.block("b").to_dense())
    torch.testing.assert_close(F.mean().to_dense(), M / 4)


def test_a_second_structure_of_the_same_name_is_refused():
    with pytest.raises(ValueError, match="structure 'dense' is already registered by Dense"):

        class Other(Symmetric):
            structure = "dense"


def test_only_registered_structures_are_saved(tmp_path):
    layout = ParamLayout.from_shapes({"a": (2,)})
    F = Symmetric(torch.eye(2, dtype=DT), layout)
    with pytest.raises(TypeError, match="FisherMatrix of a registered structure"):
        F.save(tmp_path / "f.safetensors")


def test_with_layout_renames_or_refuses():
    layout = ParamLayout.from_shapes({"a": (3,), "b": (2, 2)})
    D = Dense(spd(7, torch.Generator().manual_seed(1)), layout, num_samples=2.0)
    flat = ParamLayout.from_shapes({"theta": (7,)})
    moved = D.with_layout(flat)
    assert moved.layout == flat and moved.num_samples == 2.0
    assert torch.equal(moved.to_dense(), D.to_dense())
    block = D.block("a")  # a Dense over a sub-layout
    with pytest.raises(ValueError, match="sizes differ"):
        block.with_layout(flat)
    with pytest.raises(ValueError, match="its groups name parameters"):
        make("kfac", "tiny").with_layout(ParamLayout.from_shapes({"t": (8,)}))
