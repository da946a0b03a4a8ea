"""Every operation of every structure agrees with the same operation on ``to_dense()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fisherflow.matrices import Dense, LowRank

from .cases import DT, LAYOUTS, STRUCTURE_NAMES, dense_power, make

CASES = [(s, lay) for s in STRUCTURE_NAMES for lay in LAYOUTS]
IDS = [f"{s}-{lay}" for s, lay in CASES]
TOL = {"atol": 1e-9, "rtol": 1e-9}


def _power_supported(F, p: float) -> bool:
    return not (isinstance(F, LowRank) and not F.isotropic and p not in (0.0, 1.0))


@pytest.fixture(params=CASES, ids=IDS)
def fisher(request):
    structure, layout = request.param
    return make(structure, layout, seed=len(IDS) + hash(structure) % 7)


def test_dense_is_symmetric_psd(fisher):
    D = fisher.to_dense()
    torch.testing.assert_close(D, D.T, **TOL)
    assert torch.linalg.eigvalsh(D).min() > -1e-10


def test_mv_flat_matrix_and_dict(fisher):
    D = fisher.to_dense()
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(fisher.size, generator=gen, dtype=DT)
    V = torch.randn(fisher.size, 4, generator=gen, dtype=DT)
    torch.testing.assert_close(fisher.mv(v), D @ v, **TOL)
    torch.testing.assert_close(fisher @ V, D @ V, **TOL)
    as_dict = fisher.layout.unflatten(v)
    out = fisher.mv(as_dict)
    assert isinstance(out, dict) and list(out) == list(fisher.layout.names)
    torch.testing.assert_close(fisher.layout.flatten(out), D @ v, **TOL)


@pytest.mark.parametrize("damping", [0.0, 0.7])
def test_solve_and_inverse(fisher, damping):
    D = fisher.to_dense()
    eye = torch.eye(fisher.size, dtype=DT)
    v = torch.randn(fisher.size, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    expected = torch.linalg.solve(D + damping * eye, v)
    torch.testing.assert_close(fisher.solve(v, damping), expected, atol=1e-7, rtol=1e-7)
    if _power_supported(fisher, -1.0):
        inv = fisher.inverse(damping).to_dense()
        torch.testing.assert_close(inv, torch.linalg.inv(D + damping * eye), atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("p", [-1.0, -0.5, -0.25, 0.5, 2.0, 1.0, 0.0])
def test_power(fisher, p):
    D = fisher.to_dense()
    damping = 0.3
    if not _power_supported(fisher, p):
        with pytest.raises(NotImplementedError, match="non-isotropic"):
            fisher.power(p, damping)
        return
    expected = dense_power(D, p, damping)
    torch.testing.assert_close(fisher.power(p, damping).to_dense(), expected, atol=1e-7, rtol=1e-7)


def test_diagonal_trace_quad(fisher):
    D = fisher.to_dense()
    torch.testing.assert_close(fisher.diagonal(), D.diagonal(), **TOL)
    torch.testing.assert_close(fisher.trace(), D.trace(), **TOL)
    v = torch.randn(fisher.size, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(fisher.quad(v), v @ D @ v, **TOL)


@pytest.mark.parametrize("damping", [0.0, 0.2])
def test_logdet(fisher, damping):
    D = fisher.to_dense()
    expected = torch.logdet(D + damping * torch.eye(fisher.size, dtype=DT))
    torch.testing.assert_close(fisher.logdet(damping), expected, atol=1e-8, rtol=1e-8)


def test_eigvalsh(fisher):
    expected = torch.linalg.eigvalsh(fisher.to_dense()).flip(0)
    torch.testing.assert_close(fisher.eigvalsh(), expected, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(fisher.eigvalsh(k=3), expected[:3], atol=1e-8, rtol=1e-8)


def test_scipy_operator(fisher):
    op = fisher.to_scipy()
    x = np.random.default_rng(0).standard_normal(fisher.size)
    np.testing.assert_allclose(op @ x, fisher.to_dense().numpy() @ x, rtol=1e-10, atol=1e-10)


def test_mean_and_scale(fisher):
    D = fisher.to_dense()
    m = fisher.mean()
    torch.testing.assert_close(m.to_dense(), D / fisher.num_samples, **TOL)
    assert m.num_samples == pytest.approx(1.0)
    half = 0.5 * fisher
    torch.testing.assert_close(half.to_dense(), 0.5 * D, **TOL)
    assert half.num_samples == pytest.approx(fisher.num_samples / 2)
    assert (fisher * 0.5).kind == fisher.kind


def test_block_access(fisher):
    D = fisher.to_dense()
    names = [*fisher.layout.names, *fisher.groups()]
    for name in names:
        members = fisher.groups().get(name, [name])
        sub = fisher.block(name)
        idx = fisher.layout.indices(sub.layout.names)
        assert set(sub.layout.names) == set(members)
        torch.testing.assert_close(sub.to_dense(), D[idx][:, idx], **TOL)
    with pytest.raises(KeyError, match="neither a parameter"):
        fisher.block("no-such-parameter")


def test_metadata_travels(fisher):
    for out in (fisher.power(1.0, 0.1), 2.0 * fisher, fisher + fisher):
        assert (out.kind, out.likelihood) == (fisher.kind, fisher.likelihood)
        assert out.layout == fisher.layout


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exact_addition(structure, layout):
    F, G = make(structure, layout, seed=1), make(structure, layout, seed=2, num_samples=5.0)
    H = F + G
    torch.testing.assert_close(H.to_dense(), F.to_dense() + G.to_dense(), **TOL)
    assert H.num_samples == 15.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kfac_addition_is_exact_for_shared_input_factor(layout):
    F = make("kfac", layout, seed=1)
    G = 3.0 * F
    torch.testing.assert_close((F + G).to_dense(), 4.0 * F.to_dense(), **TOL)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ekfac_addition_exact_in_shared_basis_and_projects_otherwise(layout):
    F, G = make("ekfac", layout, seed=1), make("ekfac", layout, seed=1)
    torch.testing.assert_close((F + G).to_dense(), 2 * F.to_dense(), **TOL)
    # Different basis: the second is replaced by its diagonal in F's eigenbasis Q, so
    # F + G == F + Q diag(Qᵀ G Q) Qᵀ (F's random eigenvalues are distinct, so eigh
    # of the dense F recovers that basis).
    other = make("ekfac", layout, seed=5)
    _, Q = torch.linalg.eigh(F.to_dense())
    Go = other.to_dense()
    projected = (Q * torch.diagonal(Q.T @ Go @ Q)) @ Q.T
    torch.testing.assert_close(
        (F + other).to_dense(), F.to_dense() + projected, atol=1e-8, rtol=1e-8
    )
    torch.testing.assert_close((F + other).trace(), F.trace() + other.trace(), **TOL)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lowrank_addition_exact_when_ranks_fit(layout):
    P = LAYOUTS[layout].size
    gen = torch.Generator().manual_seed(0)
    U1, U2 = torch.randn(P, 2, generator=gen, dtype=DT), torch.randn(P, 2, generator=gen, dtype=DT)
    F = LowRank(U1, torch.tensor([1.0, 2.0], dtype=DT), LAYOUTS[layout])
    G = LowRank(U2, torch.tensor([3.0, 0.0], dtype=DT), LAYOUTS[layout])
    # rank(F+G) = 3 <= ... truncation to max(2, 2) = 2 components drops the smallest one
    total = F + G
    exact = F.to_dense() + G.to_dense()
    top = torch.linalg.eigvalsh(exact).flip(0)
    torch.testing.assert_close(total.eigvalsh(2), top[:2], atol=1e-9, rtol=1e-9)


def test_cross_structure_addition_is_refused_with_a_hint():
    with pytest.raises(TypeError, match="convert one first"):
        make("dense", "tiny") + make("diagonal", "tiny")
    total = make("dense", "tiny") + Dense.from_fisher(make("kfac", "tiny"))
    torch.testing.assert_close(
        total.to_dense(), make("dense", "tiny").to_dense() + make("kfac", "tiny").to_dense()
    )


def test_to_changes_dtype_and_keeps_metadata(fisher):
    low = fisher.to(dtype=torch.float32)
    assert low.dtype == torch.float32 and type(low) is type(fisher)
    assert (low.kind, low.likelihood, low.num_samples, low.layout) == (
        fisher.kind,
        fisher.likelihood,
        fisher.num_samples,
        fisher.layout,
    )
    torch.testing.assert_close(low.to_dense(), fisher.to_dense().float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="floating-point dtype"):
        fisher.to(dtype=torch.int64)
