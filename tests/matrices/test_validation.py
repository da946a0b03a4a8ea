"""Bad inputs raise errors that name the argument, the rule and the value."""

from __future__ import annotations

import pytest
import torch

from fisherflow.matrices import KFAC, Dense, Diagonal, KronGroup, ParamLayout

from .cases import LAYOUTS, STRUCTURE_NAMES, make


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize(
    ("damping", "error", "message"),
    [
        (-0.1, ValueError, "damping must be finite and >= 0, got -0.1"),
        (float("nan"), ValueError, "damping must be finite and >= 0, got nan"),
        (float("inf"), ValueError, "damping must be finite"),
        ("0.1", TypeError, "damping must be a real number, got str"),
    ],
)
def test_bad_damping(structure, damping, error, message):
    F = make(structure, "tiny")
    v = torch.ones(F.size, dtype=torch.float64)
    for call in (
        lambda: F.solve(v, damping),
        lambda: F.inverse(damping),
        lambda: F.logdet(damping),
        lambda: F.sample(2, damping),
        lambda: F.power(-0.5, damping),
    ):
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_wrong_vector(structure):
    F = make(structure, "tiny")
    with pytest.raises(ValueError, match=f"v must have length P={F.size}"):
        F.mv(torch.ones(F.size + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="v contains NaN or Inf"):
        F.mv(torch.full((F.size,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        F.mv({"w": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="vector\\['w'\\] must have shape \\(2, 3\\)"):
        F.mv({"w": torch.ones(3, 2), "b": torch.ones(2)})
    with pytest.raises(TypeError, match="v must be a Tensor or a dict"):
        F.mv([1.0] * F.size)


def test_singular_inverse_needs_damping():
    F = Diagonal(torch.tensor([1.0, 0.0], dtype=torch.float64), LAYOUTS["tiny"].subset(["b"]))
    with pytest.raises(ValueError, match="singular.*pass damping > 0"):
        F.solve(torch.ones(2, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="singular.*log-determinant is -inf; pass damping > 0"):
        F.logdet(0.0)
    torch.testing.assert_close(F.logdet(damping=1.0), torch.tensor(2.0, dtype=F.dtype).log())
    torch.testing.assert_close(
        F.solve(torch.ones(2, dtype=torch.float64), 1.0),
        torch.tensor([0.5, 1.0], dtype=torch.float64),
    )


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_mismatched_layouts_in_addition(structure):
    with pytest.raises(ValueError, match="different layouts"):
        make(structure, "tiny") + make(structure, "wide")


def test_mismatched_kinds_in_addition():
    with pytest.raises(ValueError, match="different kind: 'mc' and 'exact'"):
        make("dense", "tiny", kind="mc") + make("dense", "tiny", kind="exact")
    prior = make("dense", "tiny", kind=None, likelihood=None)
    assert (prior + make("dense", "tiny", kind="exact")).kind == "exact"


@pytest.mark.parametrize("factor", [-1.0, float("nan"), float("inf")])
def test_bad_scale(factor):
    with pytest.raises(ValueError, match="finite factor >= 0"):
        factor * make("dense", "tiny")


def test_bad_constructor_inputs():
    layout = LAYOUTS["tiny"]
    with pytest.raises(ValueError, match="matrix must have shape \\(8, 8\\), got \\(7, 7\\)"):
        Dense(torch.eye(7), layout)
    with pytest.raises(ValueError, match="matrix contains NaN"):
        Dense(torch.full((8, 8), float("nan")), layout)
    with pytest.raises(ValueError, match="values must be >= 0"):
        Diagonal(-torch.ones(8), layout)
    with pytest.raises(ValueError, match="kind must be one of"):
        Diagonal(torch.ones(8), layout, kind="true")
    with pytest.raises(ValueError, match="num_samples must be finite and >= 0"):
        Diagonal(torch.ones(8), layout, num_samples=-1)
    with pytest.raises(ValueError, match="bias 'w' must have shape \\(2,\\)"):
        KronGroup("b", "w").dims(layout)
    with pytest.raises(ValueError, match="names must be unique"):
        ParamLayout(("a", "a"), ((1,), (1,)))
    with pytest.raises(ValueError, match="eigvalsh|k must be an integer in \\[1, 8\\], got 9"):
        make("dense", "tiny").eigvalsh(k=9)


def test_nan_matrix_cannot_be_eigendecomposed():
    from fisherflow.matrices import eigh

    with pytest.raises(ValueError, match="NaN or Inf"):
        eigh(torch.tensor([[float("nan")]]))


@pytest.mark.parametrize("structure", ["dense", "block"])
def test_solve_is_accurate_for_badly_scaled_information(structure):
    """F = D C D with scales from 1e-6 to 1e6 (cond ~1e24): the solve keeps ~1e-10 accuracy."""
    from fisherflow.matrices import Block

    gen = torch.Generator().manual_seed(0)
    n = 6
    B = torch.randn(n, n, generator=gen, dtype=torch.float64)
    C = B @ B.T / n + torch.eye(n, dtype=torch.float64)
    d = torch.logspace(-6, 6, n, dtype=torch.float64)
    F_dense = d[:, None] * C * d[None, :]
    layout = ParamLayout.from_shapes({"theta": (n,)})
    F = (
        Dense(F_dense, layout)
        if structure == "dense"
        else Block({"all": F_dense}, {"all": ["theta"]}, layout)
    )
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.linalg.solve(C, b / d) / d  # D⁻¹ C⁻¹ D⁻¹ b, each step well conditioned
    torch.testing.assert_close(F.solve(b, 0.0), x, rtol=1e-9, atol=0)
    exact_inv = torch.linalg.inv(C) / d[:, None] / d[None, :]
    torch.testing.assert_close(F.inverse(0.0).to_dense(), exact_inv, rtol=1e-8, atol=0)


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_logdet_and_power_take_damping_explicitly(structure):
    # DESIGN: damping is explicit at every call that inverts; no hidden 0.
    F = make(structure, "tiny")
    with pytest.raises(TypeError, match="damping"):
        F.logdet()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="damping"):
        F.power(-0.5)  # type: ignore[call-arg]
    dense = F.to_dense()
    eye = torch.eye(F.size, dtype=dense.dtype)
    torch.testing.assert_close(F.logdet(damping=0.5), torch.logdet(dense + 0.5 * eye))


def test_singular_kfac_logdet_refuses_zero_damping():
    # A K-FAC whose input factor is rank one: half of F's eigenvalues are 0.
    layout = ParamLayout.from_shapes({"w": (2, 2)})
    A = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    G = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    F = KFAC({"l": KronGroup("w")}, {"l": A}, {"l": G}, layout)
    with pytest.raises(ValueError, match="singular.*pass damping > 0"):
        F.logdet(damping=0.0)
    expected = torch.logdet(F.to_dense() + 0.1 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(F.logdet(damping=0.1), expected)
