"""Property tests: every structure is PSD, and information is additive."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherflow.matrices import Block, Dense, Diagonal, ParamLayout

from .cases import DT, LAYOUTS, STRUCTURE_NAMES, make

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(
    structure=st.sampled_from(STRUCTURE_NAMES),
    layout=st.sampled_from(list(LAYOUTS)),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.0, 100.0),
)
def test_every_structure_is_psd_and_scaling_keeps_it(structure, layout, seed, scale):
    F = scale * make(structure, layout, seed=seed)
    D = F.to_dense()
    assert torch.allclose(D, D.T, atol=1e-10)
    assert torch.linalg.eigvalsh(D).min() >= -1e-9 * (1 + D.abs().max())
    assert (F.diagonal() >= -1e-12).all()
    assert (F.eigvalsh() >= -1e-9 * (1 + D.abs().max())).all()


@st.composite
def gradients(draw):
    n_params = draw(st.integers(1, 6))
    n_obs = draw(st.integers(1, 8))
    values = draw(
        st.lists(
            st.floats(-10, 10, allow_nan=False),
            min_size=n_params * n_obs,
            max_size=n_params * n_obs,
        )
    )
    return torch.tensor(values, dtype=DT).reshape(n_obs, n_params)


@SETTINGS
@given(g1=gradients(), split=st.integers(0, 8))
def test_information_is_additive_over_observations(g1, split):
    """Summing per-observation outer products in two parts equals the whole, per structure."""
    layout = ParamLayout.from_shapes({"theta": (g1.shape[1],)})
    split = min(split, g1.shape[0])
    parts = (g1[:split], g1[split:])

    def dense(g):
        return Dense(g.T @ g, layout, num_samples=g.shape[0], kind="empirical")

    def diagonal(g):
        return Diagonal((g * g).sum(0), layout, num_samples=g.shape[0], kind="empirical")

    def block(g):
        return Block({"all": g.T @ g}, {"all": ["theta"]}, layout, num_samples=g.shape[0])

    for build in (dense, diagonal, block):
        whole = build(g1)
        summed = build(parts[0]) + build(parts[1])
        torch.testing.assert_close(summed.to_dense(), whole.to_dense(), atol=1e-9, rtol=1e-9)
        assert summed.num_samples == whole.num_samples == g1.shape[0]


@SETTINGS
@given(
    structure=st.sampled_from(STRUCTURE_NAMES),
    seed=st.integers(0, 1000),
    gamma=st.floats(0.01, 10.0),
)
def test_forgetting_then_adding_matches_dense(structure, seed, gamma):
    F, G = make(structure, "tiny", seed=seed), make(structure, "tiny", seed=seed)
    total = gamma * F + G
    if structure in ("dense", "diagonal", "block", "kfac", "ekfac"):
        # same factors / basis: addition is exact for every structure here
        torch.testing.assert_close(
            total.to_dense(), (gamma + 1) * F.to_dense(), atol=1e-8, rtol=1e-8
        )
    assert (
        total.num_samples == (gamma + 1) * F.num_samples
        or abs(total.num_samples - (gamma + 1) * F.num_samples) < 1e-9
    )
