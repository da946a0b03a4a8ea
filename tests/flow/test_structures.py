"""Fisher Flow over every structure: K-FAC, EKFAC and low-rank next to dense (float64)."""

from __future__ import annotations

import pytest
import torch

from fisherflow.flow import Exponential, FisherFlow, Window, fuse, robust_fuse
from fisherflow.flow._information import _CONVERTERS
from fisherflow.matrices import EKFAC, KFAC, STRUCTURES, Dense, KronGroup, LowRank, ParamLayout
from tests.matrices.cases import KRON, LAYOUTS, make, spd

DT = torch.float64
LAYOUT = LAYOUTS["mixed"]


def params(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: scale * torch.randn(s, generator=gen, dtype=DT)
        for n, s in zip(LAYOUT.names, LAYOUT.shapes, strict=True)
    }


def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return LAYOUT.flatten(p)


def dense_fusion(thetas, mats, total=None):
    """(Σ Fᵢ)⁻¹ Σ Fᵢ θᵢ, or with a given total."""
    total = sum(mats) if total is None else total
    return torch.linalg.solve(total, sum(m @ t for m, t in zip(mats, thetas, strict=True)))


def kfac_with_shared_A(seeds, A_seed=0):
    """K-FAC estimates whose input factors A are equal: their sum is exact in K-FAC."""
    base = make("kfac", "mixed", seed=A_seed)
    out = []
    for seed in seeds:
        other = make("kfac", "mixed", seed=seed)
        out.append(KFAC(base.kron_groups, base.A, other.G, LAYOUT, other.rest, **other.meta))
    return out


def ekfac_in_one_basis(seeds):
    """EKFAC estimates in one K-FAC eigenbasis (corrections of the same basis)."""
    basis = make("kfac", "mixed", seed=0).eigenbasis()
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        S = {g: torch.rand(s.shape, generator=gen, dtype=DT) + 0.05 for g, s in basis.S.items()}
        rest = torch.rand(basis.rest.shape, generator=gen, dtype=DT) + 0.1
        out.append(EKFAC(basis.kron_groups, basis.QA, basis.QG, S, LAYOUT, rest, num_samples=5.0))
    return out


def lowrank_in_one_span(seeds, rank=3):
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(LAYOUT.size, rank, generator=gen, dtype=DT))[0]
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        R = torch.randn(rank, rank, generator=g, dtype=DT)
        diag = torch.rand(LAYOUT.size, generator=g, dtype=DT) + 0.1
        out.append(LowRank(U @ R, torch.ones(rank, dtype=DT), LAYOUT, diag=diag, num_samples=3.0))
    return out


def test_every_matrices_structure_has_a_flow_converter():
    assert set(_CONVERTERS) == set(STRUCTURES)


@pytest.mark.parametrize(
    "build", [kfac_with_shared_A, ekfac_in_one_basis, lowrank_in_one_span], ids=str
)
def test_fuse_equals_the_dense_formula_where_the_structure_adds_exactly(build):
    infos = build([1, 2])
    thetas = [params(10), params(11)]
    fused = fuse([(thetas[0], infos[0]), (thetas[1], infos[1])])
    assert fused.information.structure == infos[0].structure
    mats = [f.to_dense() for f in infos]
    want = dense_fusion([flat(t) for t in thetas], mats)
    torch.testing.assert_close(flat(fused.params), want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fused.information.to_dense(), mats[0] + mats[1])


@pytest.mark.parametrize("structure", ["kfac", "ekfac", "lowrank"])
def test_fuse_where_the_sum_is_approximate_uses_the_structures_own_sum(structure):
    # different A factors / bases / spans: Σ Iᵢ is the structure's documented sum, and
    # the fusion is exactly (F₁ ⊕ F₂)⁻¹ (F₁θ₁ + F₂θ₂) with that sum
    infos = [make(structure, "mixed", seed=s) for s in (1, 2)]
    thetas = [flat(params(10)), flat(params(11))]
    fused = fuse(list(zip(thetas, infos, strict=True)))
    mats = [f.to_dense() for f in infos]
    own = (infos[0] + infos[1]).to_dense()
    torch.testing.assert_close(fused.information.to_dense(), own)
    want = dense_fusion(thetas, mats, own)
    torch.testing.assert_close(fused.params, want, rtol=1e-9, atol=1e-10)
    # ... which is not the exact dense fusion: the approximation is real
    exact = dense_fusion(thetas, mats)
    rel = float((fused.params - exact).norm() / exact.norm())
    assert rel > 1e-6
    if structure == "lowrank":
        # truncation drops the 3 smallest of 3 + 3 components: what is lost is PSD, rank 3
        lost = torch.linalg.eigvalsh(mats[0] + mats[1] - own)
        assert float(lost.min()) > -1e-10 and int((lost > 1e-10).sum()) == 3
    else:
        assert rel < 1.0  # K-FAC's averaged A factors, EKFAC's projection: a bounded error


@pytest.mark.parametrize(
    "build", [kfac_with_shared_A, ekfac_in_one_basis, lowrank_in_one_span], ids=str
)
def test_flow_accumulates_forgets_and_steps_in_the_structure(build):
    prior, first, second = build([1, 2, 3])
    structure = prior.structure
    theta0 = params(20)
    flow = FisherFlow(theta0, prior, structure=structure, forgetting=Exponential(0.5))
    batch_theta = params(21)
    flow.update_estimate(batch_theta, first)  # accumulate with forgetting
    assert flow.information.structure == structure
    F0, F1, F2 = prior.to_dense(), first.to_dense(), second.to_dense()
    info = 0.5 * F0 + F1
    want = dense_fusion([flat(theta0), flat(batch_theta)], [0.5 * F0, F1])
    torch.testing.assert_close(flow.information.to_dense(), info, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flat(flow.params), want, rtol=1e-9, atol=1e-10)
    assert flow.num_samples == pytest.approx(0.5 * prior.num_samples + first.num_samples)
    g = flat(params(22))
    flow.step(LAYOUT.unflatten(g), second, lr=0.5, damping=0.1)  # forget, add, step
    info = 0.5 * info + F2
    eye = torch.eye(LAYOUT.size, dtype=DT)
    want = want + 0.5 * torch.linalg.solve(info + 0.1 * eye, g)
    torch.testing.assert_close(flow.information.to_dense(), info, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flat(flow.params), want, rtol=1e-9, atol=1e-10)
    assert flow.num_updates == 2
    torch.testing.assert_close(flow.covariance(), torch.linalg.inv(info), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kronecker_flow_without_prior_takes_groups_from_the_first_batch(structure):
    batches = kfac_with_shared_A([1, 2]) if structure == "kfac" else ekfac_in_one_basis([1, 2])
    flow = FisherFlow(params(0), structure=structure)
    assert flow.num_samples == 0 and float(flow.bse()["lin.bias"].abs().max()) == 0.0
    for b in batches:
        flow.step(params(5), b)
    assert isinstance(flow.information, type(batches[0]))
    torch.testing.assert_close(
        flow.information.to_dense(), batches[0].to_dense() + batches[1].to_dense()
    )
    # a flat tensor is read in the layout of a Fisher whose groups name parameters
    flat_flow = FisherFlow(flat(params(0)), batches[0], structure=structure)
    assert flat_flow.layout == LAYOUT and flat_flow.params.shape == (LAYOUT.size,)


def test_structures_refuse_information_they_cannot_hold():
    dense = Dense(spd(LAYOUT.size, torch.Generator().manual_seed(0)), LAYOUT)
    flow = FisherFlow(params(0), make("kfac", "mixed"), structure="kfac")
    with pytest.raises(ValueError, match="structure='kfac' keeps kfac information; got a 'dense'"):
        flow.step(params(1), dense)
    with pytest.raises(ValueError, match="structure='ekfac'.*got a 'lowrank'"):
        FisherFlow(params(0), make("lowrank", "mixed"), structure="ekfac")
    # K-FAC is read as EKFAC exactly (its eigenbasis), dense as low-rank exactly
    kfac = make("kfac", "mixed")
    as_ekfac = FisherFlow(params(0), kfac, structure="ekfac").information
    assert isinstance(as_ekfac, EKFAC)
    torch.testing.assert_close(as_ekfac.to_dense(), kfac.to_dense())
    as_lowrank = FisherFlow(params(0), dense, structure="lowrank").information
    assert isinstance(as_lowrank, LowRank)
    torch.testing.assert_close(as_lowrank.to_dense(), dense.to_dense())
    with pytest.raises(ValueError, match="groups name its parameters"):
        FisherFlow({"theta": torch.zeros(LAYOUT.size, dtype=DT)}, kfac, structure="kfac")


def test_robust_fuse_flags_a_corrupted_kfac_source():
    clean = kfac_with_shared_A([1, 2, 3, 4])
    truth = params(30)
    gen = torch.Generator().manual_seed(31)
    sources = []
    for info in clean:
        noise = {n: 0.01 * torch.randn(t.shape, generator=gen, dtype=DT) for n, t in truth.items()}
        sources.append(({n: truth[n] + noise[n] for n in truth}, info))
    liar = clean[0] * 1e4  # a huge information claim
    sources.insert(2, ({n: t + 50.0 for n, t in truth.items()}, liar))
    out = robust_fuse(sources)
    assert [d.index for d in out.downweighted] == [2]
    assert out.information.structure == "kfac"
    want = fuse([s for i, s in enumerate(sources) if i != 2])
    torch.testing.assert_close(flat(out.params), flat(want.params), rtol=1e-9, atol=1e-10)
    assert float((flat(out.params) - flat(truth)).abs().max()) < 0.5
    plain = fuse(sources)  # the liar dominates plain fusion
    assert float((flat(plain.params) - flat(truth)).abs().max()) > 10


def test_kron_group_layout_of_the_cases_is_the_one_used_here():
    assert set(KRON["mixed"]) == {"lin", "emb", "conv"}
    assert all(isinstance(g, KronGroup) for g in KRON["mixed"].values())
    assert isinstance(LAYOUT, ParamLayout)


@pytest.mark.parametrize("forgetting", ["window", "adaptive"])
def test_kfac_flow_with_window_and_adaptive_forgetting(forgetting):
    prior, first, second, third = kfac_with_shared_A([1, 2, 3, 4])
    policy = Window(2) if forgetting == "window" else "adaptive"
    flow = FisherFlow(params(0), prior, structure="kfac", forgetting=policy)
    for info in (first, second, third):
        flow.update_estimate(params(0), info)  # the same estimate: no drift
    assert isinstance(flow.information, KFAC)
    mats = [f.to_dense() for f in (prior, first, second, third)]
    if forgetting == "window":  # the prior stays; the window keeps the latest 2 batches
        want = mats[0] + mats[2] + mats[3]
    else:  # no drift detected: nothing is forgotten
        want = sum(mats)
    torch.testing.assert_close(flow.information.to_dense(), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flat(flow.params), flat(params(0)), rtol=1e-9, atol=1e-10)
