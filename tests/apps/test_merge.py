"""Fisher merging: the pooled least-squares fit, Matena & Raffel, RegMean, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff
from fisherflow.matrices import KFAC, KronGroup

D = torch.float64


def _halves():
    """Linear-Gaussian data in two disjoint halves with different input distributions."""
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(2, 3, generator=g, dtype=D), torch.randn(2, generator=g, dtype=D)
    halves = []
    for shift, scale in ((0.0, 1.0), (1.5, 0.4)):
        x = shift + scale * torch.randn(40, 3, generator=g, dtype=D)
        x[:, 1] *= 1 + 2 * scale  # different input covariances: K-FAC's A factors differ
        y = x @ W.T + b + 0.3 * torch.randn(40, 2, generator=g, dtype=D)
        halves.append((x, y))
    return halves


def _least_squares(x, y):
    X = torch.cat([x, torch.ones(len(x), 1, dtype=D)], dim=1)
    coef = torch.linalg.lstsq(X, y).solution  # (4, 2)
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(coef[:3].T)
        model.bias.copy_(coef[3])
    return model


@pytest.mark.parametrize("structure", ["dense", "block", "kfac", "ekfac", "lowrank"])
def test_merging_disjoint_linear_gaussian_fits_is_the_pooled_fit(structure):
    halves = _halves()
    models = [_least_squares(x, y) for x, y in halves]
    fishers = [
        ff.estimate(m, [(x, y)], "gaussian", "exact", structure, rank=8, progress=False)
        for m, (x, y) in zip(models, halves, strict=True)
    ]
    merged = ff.apps.merge(models, fishers)
    pooled = _least_squares(torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves]))
    for k, v in pooled.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=1e-8, atol=1e-9)
    # plain averaging is not the pooled fit (the test can fail)
    avg = (models[0].weight + models[1].weight) / 2
    assert (avg - pooled.weight).abs().max() > 1e-2


def test_diagonal_merge_is_the_elementwise_formula():
    g = torch.Generator().manual_seed(1)
    layout = ff.ParamLayout.from_shapes({"w": (3, 2), "b": (3,)})
    thetas = [torch.randn(9, generator=g, dtype=D) for _ in range(3)]
    diags = [torch.rand(9, generator=g, dtype=D) + 0.05 for _ in range(3)]
    weights = [0.5, 2.0, 1.0]
    fishers = [ff.Diagonal(d, layout) for d in diags]
    merged = ff.apps.merge([layout.unflatten(t) for t in thetas], fishers, weights=weights)
    num = sum(w * d * t for w, d, t in zip(weights, diags, thetas, strict=True))
    den = sum(w * d for w, d in zip(weights, diags, strict=True))
    torch.testing.assert_close(layout.flatten(merged), num / den, rtol=1e-13, atol=0)
    # damping pulls toward the normalised-weight average
    lam = 0.3
    damped = ff.apps.merge(
        [layout.unflatten(t) for t in thetas], fishers, weights=weights, damping=lam
    )
    avg = sum(w * t for w, t in zip(weights, thetas, strict=True)) / sum(weights)
    torch.testing.assert_close(
        layout.flatten(damped), (num + lam * avg) / (den + lam), rtol=1e-13, atol=0
    )


def test_kfac_with_identity_output_factor_is_regmean():
    """RegMean: W = (Σ Wᵢ Aᵢ)(Σ Aᵢ)⁻¹ for K-FAC blocks I ⊗ Aᵢ (Aᵢ = XᵢᵀXᵢ)."""
    g = torch.Generator().manual_seed(2)
    layout = ff.ParamLayout.from_shapes({"w": (4, 3)})
    Ws, As, Fs = [], [], []
    for n in (5, 9):
        X = torch.randn(n, 3, generator=g, dtype=D) * torch.tensor([1.0, 3.0, 0.3], dtype=D)
        A = X.T @ X
        Ws.append(torch.randn(4, 3, generator=g, dtype=D))
        As.append(A)
        Fs.append(KFAC({"l": KronGroup("w")}, {"l": A}, {"l": torch.eye(4, dtype=D)}, layout))
    merged = ff.apps.merge([{"w": W} for W in Ws], Fs)["w"]
    regmean = (Ws[0] @ As[0] + Ws[1] @ As[1]) @ torch.linalg.inv(As[0] + As[1])
    torch.testing.assert_close(merged, regmean, rtol=1e-9, atol=1e-10)


def test_parameters_without_fisher_follow_fallback_and_tied_tensors_stay_tied():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)).double() for _ in range(2)]
    for m in models:
        m.register_buffer("steps", torch.tensor(7))
    x, y = torch.randn(20, 3, dtype=D), torch.randint(0, 2, (20,))
    fishers = [
        ff.estimate(
            m,
            [(x, y)],
            "categorical",
            "exact",
            "kfac",
            params=["1.weight", "1.bias"],
            progress=False,
        )
        for m in models
    ]
    merged = ff.apps.merge(models, fishers, weights=[1.0, 3.0])
    assert list(merged) == list(models[0].state_dict())
    torch.testing.assert_close(
        merged["0.weight"], 0.25 * models[0][0].weight + 0.75 * models[1][0].weight
    )
    assert merged["steps"].item() == 7
    first = ff.apps.merge(models, fishers, fallback="first")
    assert torch.equal(first["0.bias"], models[0][0].bias.detach())
    with pytest.raises(
        ValueError, match="'0.weight' has no Fisher information and fallback='error'"
    ):
        ff.apps.merge(models, fishers, fallback="error")
    with pytest.raises(
        ValueError, match=r"fallback must be one of \['average', 'error', 'first'\]"
    ):
        ff.apps.merge(models, fishers, fallback="mean")
    # a tied tensor (one storage under two names) gets the merge of its Fisher-covered twin
    for m in models:
        m.out = m[1]
    tied = ff.apps.merge(models, fishers)
    assert torch.equal(tied["out.weight"], tied["1.weight"])


def test_bad_input_is_a_clear_error():
    layout = ff.ParamLayout.from_shapes({"w": (2,)})
    other = ff.ParamLayout.from_shapes({"v": (2,)})
    F = ff.Diagonal(torch.ones(2, dtype=D), layout)
    a, b = {"w": torch.zeros(2, dtype=D)}, {"w": torch.ones(2, dtype=D)}
    with pytest.raises(
        ValueError, match=r"fishers\[1\]'s layout differs.*only in the first: \['w'\]"
    ):
        ff.apps.merge([a, b], [F, ff.Diagonal(torch.ones(2, dtype=D), other)])
    with pytest.raises(ValueError, match="share one structure"):
        ff.apps.merge([a, b], [F, ff.Dense(torch.eye(2, dtype=D), layout)])
    with pytest.raises(
        ValueError, match=r"models\[1\] does not have the same tensors.*missing \['w'\]"
    ):
        ff.apps.merge([a, {"v": torch.ones(2, dtype=D)}], [F, F])
    with pytest.raises(ValueError, match=r"models\[1\]\['w'\] has shape \(3,\)"):
        ff.apps.merge([a, {"w": torch.ones(3, dtype=D)}], [F, F])
    with pytest.raises(ValueError, match=r"names tensors the models lack: \['v'\]"):
        ff.apps.merge([a, b], [ff.Diagonal(torch.ones(2, dtype=D), other)] * 2)
    with pytest.raises(ValueError, match="one entry per model"):
        ff.apps.merge([a, b], [F, F], weights=[1.0])
    with pytest.raises(ValueError, match="positive sum"):
        ff.apps.merge([a, b], [F, F], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="fishers must have one entry per model"):
        ff.apps.merge([a, b], [F])


def test_fishers_from_an_optimizer_and_from_files(tmp_path):
    """Any source of a Fisher merges: Adam's state ("Fishers for free") and saved files."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, dtype=D), torch.randint(0, 2, (64,))
    models, fishers = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = nn.Linear(3, 2).double()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for i in range(0, 64, 16):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[i : i + 16]), y[i : i + 16]).backward()
            opt.step()
        F = ff.fisher_from_optimizer(opt, batch_size=16, num_samples=64, model=m)
        F.save(tmp_path / f"f{seed}.safetensors")
        models.append(m)
        fishers.append(F)
    merged = ff.apps.merge(models, fishers)
    loaded = ff.apps.merge(models, [ff.load(tmp_path / f"f{s}.safetensors") for s in (0, 1)])
    d = [F.layout.unflatten(F.diagonal()) for F in fishers]
    expected = (d[0]["weight"] * models[0].weight + d[1]["weight"] * models[1].weight) / (
        d[0]["weight"] + d[1]["weight"]
    )
    torch.testing.assert_close(merged["weight"], expected.detach())
    torch.testing.assert_close(loaded["weight"], merged["weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_inplace_diagonal_merge_is_bitwise_merge_block(dtype, damping):
    from fisherflow.apps._diagonal import merge_diagonal_inplace
    from fisherflow.apps.merging import merge_block

    g = torch.Generator().manual_seed(3)
    lay = ff.ParamLayout.from_shapes({"w": (3, 5)})
    thetas = [torch.randn(3, 5, generator=g, dtype=dtype) for _ in range(3)]
    values = [torch.rand(15, generator=g, dtype=dtype) for _ in range(3)]
    for v in values:  # some entries no model informs (the pseudo-inverse's cut-off)
        v[:4] = 0.0
    fishers = [ff.Diagonal(v, lay) for v in values]
    weights = [2.0, 0.5, 1.0]
    expected, masses = merge_block([{"w": t} for t in thetas], fishers, weights, damping)
    before = [t.clone() for t in thetas + values]
    merged, got_masses = merge_diagonal_inplace(
        thetas.__getitem__, values.__getitem__, weights, damping, dtype
    )
    assert torch.equal(merged.view(3, 5), expected["w"])
    assert got_masses == masses
    assert all(torch.equal(a, b) for a, b in zip(before, thetas + values, strict=True))
    if damping == 0.0:  # uninformed entries keep the weighted average
        avg = sum(w * t for w, t in zip(weights, thetas, strict=True)) / sum(weights)
        torch.testing.assert_close(merged[:4], avg.reshape(-1)[:4])
