"""K-FAC merge solves: simultaneous diagonalisation against dense float64 formulas."""

from __future__ import annotations

import pytest
import torch

import fisherflow as ff
from fisherflow.apps._kron_solve import KronPair, psd_factors, simultaneous_basis
from fisherflow.apps._solve import weighted_solve
from fisherflow.matrices import KFAC, KronGroup

D = torch.float64


def _psd(n, rank, g, zero_rows=0):
    x = torch.randn(n, rank, generator=g, dtype=D)
    x[:zero_rows] = 0.0  # inputs that are always 0 (MNIST's border pixels)
    return x @ x.T


def _kfac(A, G, rest=None):
    layout = ff.ParamLayout.from_shapes({"w": (3, 4), "b": (3,), "s": (2,)})
    groups = {"l": KronGroup("w", "b")}
    if rest is None:
        rest = torch.rand(2, dtype=D) + 0.1
    return KFAC(groups, {"l": A}, {"l": G}, layout, rest, num_samples=10.0)


@pytest.mark.parametrize("case", ["definite", "shared_null", "one_diagonal", "both_diagonal"])
def test_simultaneous_basis_diagonalises_both(case):
    g = torch.Generator().manual_seed(0)
    b1, b2 = _psd(5, 5, g), _psd(5, 5, g)
    if case == "shared_null":
        b1, b2 = _psd(5, 3, g, zero_rows=2), _psd(5, 2, g, zero_rows=2)
    if case == "one_diagonal":
        b2 = torch.rand(5, generator=g, dtype=D)
    if case == "both_diagonal":
        b1, b2 = torch.rand(5, generator=g, dtype=D), torch.zeros(5, dtype=D)
    S, d1, d2 = simultaneous_basis(b1, b2)
    S = torch.eye(5, dtype=D) if S is None else S
    for b, d in ((b1, d1), (b2, d2)):
        dense = torch.diag(b) if b.dim() == 1 else b
        torch.testing.assert_close(S.T @ dense @ S, torch.diag(d), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(S) == 5  # invertible


@pytest.mark.parametrize("zero_rows", [0, 2])
def test_two_models_without_damping_are_solved_exactly_without_cg(zero_rows):
    g = torch.Generator().manual_seed(1)
    Fs = [
        _kfac(_psd(5, 5 - zero_rows, g, zero_rows), _psd(3, 3, g)),
        _kfac(_psd(5, 2, g, zero_rows), _psd(3, 1, g)),
    ]
    w = [0.7, 1.3]
    K = sum(wi * F.to_dense() for wi, F in zip(w, Fs, strict=True))
    b = K @ torch.randn(17, generator=g, dtype=D)
    info: dict[str, int] = {}
    x = weighted_solve(Fs, w, b, 0.0, info=info)
    assert info["iterations"] == 0
    # inputs no model saw are orthogonal to the rest: the pseudo-inverse solution
    torch.testing.assert_close(x, torch.linalg.pinv(K, hermitian=True) @ b, atol=1e-10, rtol=0)


def test_directions_one_model_each_informs_give_a_solution():
    """Input seen only by model 1 × output moved only by model 2: D = 0 off-orthogonal."""
    g = torch.Generator().manual_seed(2)
    Fs = [_kfac(_psd(5, 2, g), _psd(3, 1, g)), _kfac(_psd(5, 2, g), _psd(3, 1, g))]
    K = Fs[0].to_dense() + Fs[1].to_dense()
    assert torch.linalg.matrix_rank(K) < 17
    b = K @ torch.randn(17, generator=g, dtype=D)
    x = weighted_solve(Fs, [1.0, 1.0], b)
    torch.testing.assert_close(K @ x, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_damped_pair_bounds_the_damped_sum_and_cg_reaches_the_dense_solve(damping):
    g = torch.Generator().manual_seed(3)
    Fs = [_kfac(_psd(5, 3, g), _psd(3, 3, g)), _kfac(_psd(5, 4, g), _psd(3, 2, g))]
    K = Fs[0].to_dense() + 2.0 * Fs[1].to_dense() + damping * torch.eye(17, dtype=D)
    # factored damping: the preconditioner P is SPD and P ⪰ K + λI
    P = torch.linalg.inv(KronPair(Fs[0], 2.0 * Fs[1], damping).solve(torch.eye(17, dtype=D)))
    assert torch.linalg.eigvalsh(0.5 * (P + P.T) - K).min() > -1e-9 * float(K.norm())
    b = torch.randn(17, generator=g, dtype=D)
    info: dict[str, int] = {}
    x = weighted_solve(Fs, [1.0, 2.0], b, damping, info=info, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(K, b), atol=1e-10, rtol=1e-9)
    assert 1 <= info["iterations"] <= 17


def test_factors_indefinite_by_rounding_are_projected():
    g = torch.Generator().manual_seed(6)
    A = _psd(5, 2, g)
    vals, vecs = torch.linalg.eigh(A)
    F = _kfac((vecs * vals.clamp_min(-1e-6)) @ vecs.T - 1e-6 * vecs[:, :1] @ vecs[:, :1].T,
              _psd(3, 3, g))  # fmt: skip
    assert torch.linalg.eigvalsh(F.A["l"]).min() < 0
    P = psd_factors(F)
    assert torch.linalg.eigvalsh(P.A["l"]).min() >= -1e-12
    torch.testing.assert_close(P.A["l"], F.A["l"], atol=2e-6, rtol=0)
    definite = _kfac(_psd(5, 5, g), _psd(3, 3, g))
    assert psd_factors(definite) is definite


def test_many_models_both_preconditioners_reach_the_dense_solve():
    g = torch.Generator().manual_seed(4)
    Fs = [_kfac(_psd(5, 5, g), _psd(3, 3, g)) for _ in range(4)]
    w = [1.0, 2.0, 0.5, 1.0]
    K = sum(wi * F.to_dense() for wi, F in zip(w, Fs, strict=True)) + 1e-3 * torch.eye(17)
    b = torch.randn(17, generator=g, dtype=D)
    steps = {}
    for name in ("pair", "sum"):
        info: dict[str, int] = {}
        x = weighted_solve(Fs, w, b, 1e-3, info=info, preconditioner=name, tol=1e-12)
        torch.testing.assert_close(x, torch.linalg.solve(K.to(D), b), atol=1e-9, rtol=0)
        steps[name] = info["iterations"]
    assert steps["pair"] < steps["sum"]  # on these random factors; not on MNIST's
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        weighted_solve(Fs, w, b, preconditioner="nope")


def test_kron_pair_example_and_rest_parameters():
    g = torch.Generator().manual_seed(5)
    F1, F2 = _kfac(_psd(5, 5, g), _psd(3, 3, g)), _kfac(_psd(5, 5, g), _psd(3, 3, g))
    K = F1.to_dense() + F2.to_dense()
    b = torch.randn(17, generator=g, dtype=D)
    torch.testing.assert_close(KronPair(F1, F2).solve(b), torch.linalg.solve(K, b))
