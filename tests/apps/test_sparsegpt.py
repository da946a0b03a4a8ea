"""The SparseGPT-style sequential OBS sweep against the joint OBS solve (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fisherflow as ff
from fisherflow.apps.sparsegpt import sequential_compensation


def _problem(n_out=5, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    B = a @ a.T / (3 * n) + 0.05 * torch.eye(n, dtype=torch.float64)
    rows = torch.randn(n_out, n, generator=g, dtype=torch.float64)
    return rows, B


def _joint(rows, keep, B):
    """Brute force: per row, argmin (w−θ)ᵀB(w−θ) with w = 0 off the kept support."""
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        k, q = keep[r], ~keep[r]
        out[r, k] = rows[r, k] + torch.linalg.solve(B[k][:, k], B[k][:, q] @ rows[r, q])
    return out


def _loss(w, rows, B):
    d = w - rows
    return ((d @ B) * d).sum(1)


@pytest.mark.parametrize("block", [1, 3, 128])
def test_equals_the_joint_refit_when_pruned_weights_come_first(block):
    rows, B = _problem()
    counts = torch.tensor([0, 2, 4, 7, 9])
    keep = torch.arange(10)[None, :] >= counts[:, None]  # row r prunes its first counts[r]
    got = sequential_compensation(rows, keep, torch.linalg.inv(B), block=block)
    torch.testing.assert_close(got, _joint(rows, keep, B), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", [1, 4, 128])
def test_general_masks_are_feasible_and_between_joint_and_no_compensation(block):
    rows, B = _problem(seed=1)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(rows.shape, generator=g, dtype=torch.float64) > 0.5
    got = sequential_compensation(rows, keep, torch.linalg.inv(B), block=block)
    assert bool((got[~keep] == 0).all())
    joint, masked = _joint(rows, keep, B), rows * keep
    assert bool((_loss(joint, rows, B) <= _loss(got, rows, B) + 1e-12).all())
    assert bool((_loss(got, rows, B) <= _loss(masked, rows, B) + 1e-12).all())
    assert bool((_loss(got, rows, B) > _loss(joint, rows, B) + 1e-6).any())  # not the joint
    # blocking is a reordering of the same updates
    one = sequential_compensation(rows, keep, torch.linalg.inv(B), block=1)
    torch.testing.assert_close(got, one, rtol=1e-10, atol=1e-12)


def test_prune_method_sparsegpt_uses_obs_masks_and_the_sweep():
    g = torch.Generator().manual_seed(2)
    model = nn.Linear(12, 6).double()
    a = torch.randn(13, 13, generator=g, dtype=torch.float64)
    A = a @ a.T / 13
    G = torch.diag(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    layout = ff.ParamLayout.from_model(model)
    F = ff.KFAC({"l": ff.KronGroup("weight", "bias")}, {"l": A}, {"l": G}, layout)
    obs, seq = copy.deepcopy(model), copy.deepcopy(model)
    m1 = ff.apps.prune(obs, F, 0.5, method="obs", rel_damping=0.01)
    m2 = ff.apps.prune(seq, F, 0.5, method="sparsegpt", rel_damping=0.01)
    assert torch.equal(m1["weight"], m2["weight"])
    rows = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    keep = torch.cat([m2["weight"], torch.ones(6, 1, dtype=torch.bool)], 1)
    B = A + 0.01 * float(A.diagonal().mean()) * torch.eye(13, dtype=torch.float64)
    want = sequential_compensation(rows, keep, torch.linalg.inv(B))
    torch.testing.assert_close(seq.weight.detach(), want[:, :12], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(seq.bias.detach(), want[:, 12], rtol=1e-10, atol=1e-12)
    assert _loss(want, rows, B).sum() >= _loss(_joint(rows, keep, B), rows, B).sum() - 1e-12


def test_sparsegpt_rejects_non_kfac_fishers_and_absolute_damping():
    model = nn.Linear(4, 2).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randn(20, 2, dtype=torch.float64)
    block = ff.estimate(model, [(x, y)], "gaussian", "exact", "block", progress=False)
    with pytest.raises(ValueError, match="K-FAC"):
        ff.apps.prune(model, block, 0.5, method="sparsegpt")
    kfac = ff.estimate(model, [(x, y)], "gaussian", "exact", "kfac", progress=False)
    with pytest.raises(ValueError, match="damping=0"):
        ff.apps.prune(model, kfac, 0.5, method="sparsegpt", damping=0.1)
    with pytest.raises(ValueError, match="keep"):
        sequential_compensation(torch.ones(2, 3), torch.ones(2, 2, dtype=torch.bool), torch.eye(3))
