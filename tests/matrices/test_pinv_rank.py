"""``pinv_solve`` and ``rank`` of every structure against the dense pseudo-inverse (float64)."""

from __future__ import annotations

import pytest
import torch

from fisherflow.matrices import (
    EKFAC,
    KFAC,
    STRUCTURES,
    Block,
    Dense,
    Diagonal,
    FisherMatrix,
    LowRank,
    ParamLayout,
)

from .cases import DT, KRON, LAYOUTS, STRUCTURE_NAMES, make, spd

RCOND = 1e-10  # well above float64 noise, well below every kept eigenvalue


def unit_diagonal(n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """A rank-``rank`` PSD matrix with unit diagonal (Jacobi scaling is the identity)."""
    B = torch.randn(n, rank, generator=gen, dtype=DT)
    B = B / B.norm(dim=1, keepdim=True)
    return B @ B.T


def deficient(structure: str, layout_name: str, seed: int = 0) -> FisherMatrix:
    """A rank-deficient instance of each structure."""
    gen = torch.Generator().manual_seed(seed)
    layout = LAYOUTS[layout_name]
    P = layout.size
    if structure == "dense":
        return Dense(unit_diagonal(P, P // 2, gen), layout)
    if structure == "diagonal":
        values = torch.rand(P, generator=gen, dtype=DT) + 0.1
        values[::3] = 0.0
        return Diagonal(values, layout)
    if structure == "block":
        groups = {n: [n] for n in layout.names}
        sizes = {n: layout.subset([n]).size for n in layout.names}
        blocks = {n: unit_diagonal(k, max(1, k // 2), gen) for n, k in sizes.items()}
        return Block(blocks, groups, layout)
    groups = KRON[layout_name]
    covered = {n for g in groups.values() for n in g.names}
    rest_size = layout.subset([n for n in layout.names if n not in covered]).size
    rest = None
    if rest_size:
        rest = torch.rand(rest_size, generator=gen, dtype=DT) + 0.1
        rest[0] = 0.0
    if structure in ("kfac", "ekfac"):
        A, G = {}, {}
        for g, spec in groups.items():
            n_out, n_cols = spec.dims(layout)
            if spec.input_major:
                A[g] = torch.rand(n_cols, generator=gen, dtype=DT) + 0.1
                A[g][0] = 0.0
            else:
                A[g] = spd(n_cols, gen, rank=max(1, n_cols - 2)) - 0.05 * torch.eye(
                    n_cols, dtype=DT
                )
            G[g] = spd(n_out, gen)
        F = KFAC(groups, A, G, layout, rest)
        if structure == "kfac":
            return F
        basis = F.eigenbasis()
        S = {g: torch.rand(basis.S[g].shape, generator=gen, dtype=DT) + 0.05 for g in groups}
        for s in S.values():
            s.view(-1)[::4] = 0.0
        return EKFAC(groups, basis.QA, basis.QG, S, layout, rest)
    U = torch.randn(P, 3, generator=gen, dtype=DT)
    s = torch.rand(3, generator=gen, dtype=DT) * 5 + 0.5
    if structure == "lowrank_iso":
        return LowRank(U, s, layout)  # d = 0: rank 3
    diag = torch.rand(P, generator=gen, dtype=DT) + 0.1
    diag[:2] = 0.0
    U[:2] = 0.0  # coordinates 0 and 1 carry no information at all
    return LowRank(U, s, layout, diag=diag)  # non-isotropic, singular d: dense fallback


def dense_pinv(D: torch.Tensor, damping: float, rcond: float | None) -> torch.Tensor:
    shifted = D + damping * torch.eye(D.shape[0], dtype=D.dtype)
    return torch.linalg.pinv(shifted, hermitian=True, rtol=rcond)


def test_structures_registry_holds_the_six():
    assert set(STRUCTURES) == {"dense", "diagonal", "block", "kfac", "ekfac", "lowrank"}
    for name, cls in STRUCTURES.items():
        assert cls.structure == name and issubclass(cls, FisherMatrix)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_pinv_solve_full_rank_equals_dense(structure, layout, damping):
    F = make(structure, layout)
    D = F.to_dense()
    v = torch.randn(F.size, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    want = dense_pinv(D, damping, None) @ v
    got = F.pinv_solve(v, damping=damping)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert F.rank() == int(torch.linalg.matrix_rank(D, hermitian=True)) == F.size


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_pinv_solve_and_rank_rank_deficient(structure, layout):
    F = deficient(structure, layout)
    D = F.to_dense()
    want_rank = int(torch.linalg.matrix_rank(D, hermitian=True, rtol=RCOND))
    assert want_rank < F.size
    assert F.rank(rcond=RCOND) == want_rank
    v = torch.randn(F.size, generator=torch.Generator().manual_seed(2), dtype=DT)
    got = F.pinv_solve(v, rcond=RCOND)
    torch.testing.assert_close(got, dense_pinv(D, 0.0, RCOND) @ v, rtol=1e-7, atol=1e-9)
    damped = F.pinv_solve(v, damping=0.5, rcond=RCOND)
    torch.testing.assert_close(damped, torch.linalg.solve(D + 0.5 * torch.eye(F.size, dtype=DT), v))


def test_dense_pinv_is_a_generalised_inverse_with_any_diagonal():
    # Jacobi scaling changes which generalised inverse is returned when the diagonal is
    # not constant; it is still one: F F⁺ F = F, and F x = v for v in the range of F.
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([1e-3, 1e-2, 1.0, 1.0, 10.0, 1e3], dtype=DT)
    B = scales[:, None] * torch.randn(6, 3, generator=gen, dtype=DT)  # parameters' scales
    layout = ParamLayout.from_shapes({"t": (6,)})
    M = B @ B.T
    F = Dense(M, layout)
    X = F.pinv_solve(M, rcond=RCOND)
    torch.testing.assert_close(M @ X, M, rtol=1e-8, atol=1e-8 * float(M.abs().max()))
    assert F.rank(rcond=RCOND) == 3


def test_pinv_solve_keeps_the_form_and_checks_input():
    F = make("kfac", "tiny")
    v = {n: torch.ones(s, dtype=DT) for n, s in zip(F.layout.names, F.layout.shapes, strict=True)}
    out = F.pinv_solve(v)
    assert isinstance(out, dict) and set(out) == set(v)
    torch.testing.assert_close(F.layout.flatten(out), F.pinv_solve(F.layout.flatten(v)))
    with pytest.raises(ValueError, match=r"rcond must be in \[0, 1\), got 2.0"):
        F.pinv_solve(F.layout.flatten(v), rcond=2.0)
    with pytest.raises(TypeError, match="rcond must be None or a real number"):
        F.rank(rcond="tiny")
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        F.pinv_solve(F.layout.flatten(v), damping=-1.0)


def test_lowrank_components_are_not_its_rank():
    F = deficient("lowrank_iso", "wide")
    assert F.num_components == 3 and F.rank(rcond=RCOND) == 3
