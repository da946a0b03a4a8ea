"""K-FAC's vectorisation order, factor conventions and eigendecomposition robustness."""

from __future__ import annotations

import torch

from fisherflow.matrices import KFAC, KronGroup, ParamLayout, linalg

from .cases import DT, spd

GEN = torch.Generator().manual_seed(0)


def test_output_major_weight_is_kron_G_A_in_layout_order():
    layout = ParamLayout.from_shapes({"lin.weight": (3, 4)})
    A, G = spd(4, GEN), spd(3, GEN)
    F = KFAC({"lin": KronGroup("lin.weight")}, {"lin": A}, {"lin": G}, layout)
    torch.testing.assert_close(F.to_dense(), torch.kron(G, A))


def test_conv_weight_flattens_input_channels_and_kernel():
    layout = ParamLayout.from_shapes({"conv.weight": (2, 3, 2, 2)})
    A, G = spd(12, GEN), spd(2, GEN)
    F = KFAC({"conv": KronGroup("conv.weight")}, {"conv": A}, {"conv": G}, layout)
    torch.testing.assert_close(F.to_dense(), torch.kron(G, A))


def test_input_major_weight_is_kron_A_G():
    layout = ParamLayout.from_shapes({"emb.weight": (5, 2)})
    A, G = torch.rand(5, generator=GEN, dtype=DT), spd(2, GEN)
    F = KFAC({"emb": KronGroup("emb.weight", None, True)}, {"emb": A}, {"emb": G}, layout)
    torch.testing.assert_close(F.to_dense(), torch.kron(torch.diag(A), G))


def test_bias_is_the_last_input_column():
    """With a bias the block is kron(G, A) over [W | b] row-major, permuted to layout order."""
    layout = ParamLayout.from_shapes({"w": (3, 2), "b": (3,)})
    A, G = spd(3, GEN), spd(3, GEN)
    F = KFAC({"l": KronGroup("w", "b")}, {"l": A}, {"l": G}, layout)
    # position of (row i, column j) of [W | b] in the layout's flat vector
    perm = [i * 2 + j if j < 2 else 6 + i for i in range(3) for j in range(3)]
    dense = torch.zeros(9, 9, dtype=DT)
    dense[torch.tensor(perm)[:, None], torch.tensor(perm)[None, :]] = torch.kron(G, A)
    torch.testing.assert_close(F.to_dense(), dense)


def test_gradient_outer_products_give_factors_of_a_one_sample_fisher():
    """For one observation, g = vec(δ aᵀ) and g gᵀ = (δδᵀ) ⊗ (aaᵀ) exactly."""
    a, delta = torch.randn(4, generator=GEN, dtype=DT), torch.randn(3, generator=GEN, dtype=DT)
    layout = ParamLayout.from_shapes({"w": (3, 4)})
    g = torch.outer(delta, a).reshape(-1)
    F = KFAC(
        {"l": KronGroup("w")},
        {"l": torch.outer(a, a)},
        {"l": torch.outer(delta, delta)},
        layout,
        num_samples=1,
    )
    torch.testing.assert_close(F.to_dense(), torch.outer(g, g))


def test_eigh_retries_in_float64(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    vals, _ = linalg.eigh(torch.diag(torch.tensor([3.0, 1.0])))
    assert calls == [torch.float32, torch.float64]
    assert vals.dtype == torch.float32 and vals.tolist() == [1.0, 3.0]


def test_eigh_retries_when_float32_returns_nan(monkeypatch):
    real = torch.linalg.eigh

    def nan_in_float32(m):
        vals, vecs = real(m)
        return (vals * float("nan"), vecs) if m.dtype == torch.float32 else (vals, vecs)

    monkeypatch.setattr(torch.linalg, "eigh", nan_in_float32)
    vals, _ = linalg.eigh(torch.eye(2))
    assert torch.isfinite(vals).all()
