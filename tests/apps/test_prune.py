"""``ff.apps.prune``: OBS is the least-squares refit, saliencies are their formulas,
patterns and scopes count exactly, and bad input fails with a named error."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fisherflow as ff
from fisherflow.apps.masks import to_rows

N, D, K = 120, 8, 3


@pytest.fixture
def least_squares():
    """A linear least-squares problem and its fitted ``nn.Linear`` (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    x = x @ torch.randn(D, D, generator=g, dtype=torch.float64)  # correlated inputs
    y = x @ torch.randn(D, K, generator=g, dtype=torch.float64)
    y = y + torch.randn(N, K, generator=g, dtype=torch.float64)
    xb = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xb, y).solution
    model = nn.Linear(D, K).double()
    with torch.no_grad():
        model.weight.copy_(sol[:D].T)
        model.bias.copy_(sol[D])
    return model, x, y, xb


def _fisher(model, x, y, structure):
    return ff.estimate(
        model, [(x, y)], "gaussian", kind="exact", structure=structure, progress=False
    )


def _assert_refit(model, keep, xb, y):
    """Each row's kept weights (and bias) are the least-squares refit on its support."""
    for r in range(K):
        cols = torch.cat([keep[r], torch.tensor([True])])
        refit = torch.linalg.lstsq(xb[:, cols], y[:, r]).solution
        got = torch.cat([model.weight[r][keep[r]], model.bias[r : r + 1]]).detach()
        torch.testing.assert_close(got, refit, rtol=1e-9, atol=1e-9)
        assert bool((model.weight[r][~keep[r]] == 0).all())


@pytest.mark.parametrize("structure", ["dense", "block", "kfac", "ekfac"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_obs_is_the_least_squares_refit_on_the_kept_support(least_squares, structure, pattern):
    model, x, y, xb = least_squares
    F = _fisher(model, x, y, structure)
    masks = ff.apps.prune(model, F, 0.5, pattern=pattern, method="obs")
    keep = masks["weight"]
    assert int((~keep).sum()) == math.floor(0.5 * D * K)
    _assert_refit(model, keep, xb, y)


@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_kfac_obs_solves_on_the_smaller_of_pruned_and_kept_sets(least_squares, scope, sparsity):
    """Rows solve on Q (sparsity <= 1/2) or on K (above), equal or ragged |Q| per row:
    every path is the least-squares refit on the kept support."""
    model, x, y, xb = least_squares
    F = _fisher(model, x, y, "kfac")
    keep = ff.apps.prune(model, F, sparsity, method="obs", scope=scope)["weight"]
    if scope == "row":
        assert bool(((~keep).sum(1) == math.floor(sparsity * D)).all())
    _assert_refit(model, keep, xb, y)


def test_obs_saliency_is_its_formula_for_dense_block_and_kfac(least_squares):
    model, x, y, _ = least_squares
    theta = model.weight.detach()
    lam = 0.3
    for structure in ("dense", "block", "kfac"):
        F = _fisher(model, x, y, structure)
        h_inv = torch.linalg.inv(F.to_dense() + lam * torch.eye(F.size, dtype=torch.float64))
        inv_diag = F.layout.unflatten(h_inv.diagonal())["weight"]
        want = theta.square() / (2 * inv_diag)
        got = ff.apps.saliency(model, F, "obs", damping=lam)["weight"]
        # K-FAC: row-wise G_rr A + λI, which is F + λI itself here (G is diagonal)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_kfac_obs_uses_the_row_blocks_of_a_non_diagonal_g():
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(4, 3, bias=False).double()
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    gm = torch.randn(3, 3, generator=g, dtype=torch.float64)
    A, G = a @ a.T + torch.eye(4, dtype=torch.float64), gm @ gm.T
    layout = ff.ParamLayout.from_model(model)
    F = ff.KFAC({"l": ff.KronGroup("weight")}, {"l": A}, {"l": G}, layout)
    lam = 0.1
    want = torch.stack(
        [
            model.weight[r].detach().square()
            / (2 * torch.linalg.inv(G[r, r] * A + lam * torch.eye(4)).diagonal())
            for r in range(3)
        ]
    )
    torch.testing.assert_close(ff.apps.saliency(model, F, "obs", damping=lam)["weight"], want)


def test_obd_magnitude_and_wanda_saliencies_are_their_formulas(least_squares):
    model, x, y, _ = least_squares
    theta = model.weight.detach()
    F = _fisher(model, x, y, "kfac")
    diag = F.layout.unflatten(F.diagonal())["weight"]
    torch.testing.assert_close(ff.apps.saliency(model, F, "obd")["weight"], 0.5 * diag * theta**2)
    torch.testing.assert_close(ff.apps.saliency(model, None, "magnitude")["weight"], theta.abs())
    rms = x.square().mean(0).sqrt()  # K-FAC's A is the mean of [x, 1][x, 1]ᵀ
    wanda = ff.apps.saliency(model, F, "wanda")["weight"]
    torch.testing.assert_close(wanda, theta.abs() * rms)
    norms = torch.arange(1.0, D + 1, dtype=torch.float64)
    given = ff.apps.saliency(model, None, "wanda", activations={"weight": norms})["weight"]
    torch.testing.assert_close(given, theta.abs() * norms)


def _hf_conv1d(n_in, n_out):
    transformers = pytest.importorskip("transformers")
    return transformers.pytorch_utils.Conv1D(n_out, n_in)


def test_nm_masks_satisfy_the_pattern_on_linear_conv_and_hf_conv1d():
    torch.manual_seed(0)
    conv1d = _hf_conv1d(8, 5)  # stored (n_in, n_out): rows are its columns
    model = nn.ModuleDict(
        {"lin": nn.Linear(12, 5), "conv": nn.Conv2d(2, 3, 2), "hf": conv1d}
    ).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = ff.apps.prune(model, None, None, pattern="2:4", method="magnitude")
    assert set(masks) == {"lin.weight", "conv.weight", "hf.weight"}
    for name, mask in masks.items():
        rows = to_rows(mask, name == "hf.weight")
        groups = rows.reshape(rows.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()), name
        # the two kept are the two largest in magnitude of each group
        mags = to_rows(before[name].abs(), name == "hf.weight").reshape(groups.shape)
        top = mags.topk(2, dim=-1).indices
        assert bool(groups.gather(-1, top).all()), name
        param = dict(model.named_parameters())[name]
        assert bool((param[~mask] == 0).all()) and bool((param[mask] == before[name][mask]).all())
    assert bool((model["lin"].bias == before["lin.bias"]).all())  # biases are not pruned


def test_layer_global_and_row_scopes_count_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    with torch.no_grad():
        model[2].weight.mul_(10.0)  # global magnitude spares the second layer
    sizes = {"0.weight": 70, "2.weight": 21}
    s = 0.37
    layer = ff.apps.prune(_copy(model), None, s, method="magnitude")
    assert {n: int((~m).sum()) for n, m in layer.items()} == {
        n: math.floor(s * v) for n, v in sizes.items()
    }
    glob = ff.apps.prune(_copy(model), None, s, method="magnitude", scope="global")
    assert sum(int((~m).sum()) for m in glob.values()) == math.floor(s * 91)
    assert int((~glob["2.weight"]).sum()) == 0
    rows = ff.apps.prune(_copy(model), None, s, method="magnitude", scope="row")
    assert bool(((~rows["0.weight"]).sum(1) == math.floor(s * 10)).all())


def _copy(model):
    return copy.deepcopy(model)


def test_pruned_weights_stay_zero_through_fisher_and_weight_files(least_squares, tmp_path):
    model, x, y, _ = least_squares
    F = _fisher(model, x, y, "block")
    F.save(str(tmp_path / "f.safetensors"))
    loaded = ff.load(str(tmp_path / "f.safetensors"))
    first, second = _copy(model), _copy(model)
    m1 = ff.apps.prune(first, F, 0.5, method="obs")
    m2 = ff.apps.prune(second, loaded, 0.5, method="obs")
    assert torch.equal(m1["weight"], m2["weight"])
    assert torch.equal(first.weight, second.weight)
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, tmp_path / "w.st")
    back = load_file(tmp_path / "w.st")
    assert bool((back["weight"][~m1["weight"]] == 0).all())
    assert torch.equal(back["weight"], first.weight.detach())


def test_obs_with_a_diagonal_fisher_is_obd_without_moving_weights(least_squares):
    model, x, y, _ = least_squares
    F = _fisher(model, x, y, "diagonal")
    before = model.weight.detach().clone()
    obd = ff.apps.saliency(model, F, "obd")["weight"]
    torch.testing.assert_close(ff.apps.saliency(model, F, "obs")["weight"], obd)
    masks = ff.apps.prune(model, F, 0.5, method="obs")
    assert torch.equal(model.weight.detach(), before * masks["weight"])


def test_bad_input_fails_with_named_errors(least_squares):
    model, x, y, _ = least_squares
    F = _fisher(model, x, y, "block")
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity must be in"):
            ff.apps.prune(_copy(model), F, bad)
    with pytest.raises(TypeError, match="sparsity"):
        ff.apps.prune(_copy(model), F, "0.5")
    with pytest.raises(ValueError, match="sparsity 0.3 disagrees with pattern '2:4'"):
        ff.apps.prune(_copy(model), F, 0.3, pattern="2:4")
    with pytest.raises(ValueError, match="multiple of 3"):
        ff.apps.prune(_copy(model), F, None, pattern="1:3")
    with pytest.raises(ValueError, match="pattern must be"):
        ff.apps.prune(_copy(model), F, 0.5, pattern="2/4")
    with pytest.raises(ValueError, match="method must be one of"):
        ff.apps.prune(_copy(model), F, 0.5, method="random")
    with pytest.raises(ValueError, match="scope must be one of"):
        ff.apps.prune(_copy(model), F, 0.5, scope="model")
    with pytest.raises(ValueError, match="fisher: method 'obd' needs a Fisher"):
        ff.apps.prune(_copy(model), None, 0.5, method="obd")
    other = nn.Linear(D + 1, K).double()
    wrong = _fisher(other, torch.cat([x, x[:, :1]], 1), y, "block")
    with pytest.raises(ValueError, match="fisher: its layout does not match"):
        ff.apps.prune(_copy(model), wrong, 0.5)
    with pytest.raises(ValueError, match="params must name parameters"):
        ff.apps.prune(_copy(model), F, 0.5, params=["nope"])
    with pytest.raises(ValueError, match="damping must be"):
        ff.apps.prune(_copy(model), F, 0.5, damping=-1.0)
    singular = _fisher(model, x[:3], y[:3], "block")  # rank 3 < 9 parameters
    with pytest.raises(ValueError, match="singular.*damping > 0"):
        ff.apps.prune(_copy(model), singular, 0.5)
    ff.apps.prune(_copy(model), singular, 0.5, damping=1e-3)  # damping makes it solvable
    with pytest.raises(ValueError, match="activations"):
        ff.apps.prune(_copy(model), None, 0.5, method="wanda")
    nan_model = _copy(model)
    with torch.no_grad():
        nan_model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ff.apps.prune(nan_model, F, 0.5)


def test_kfac_obs_paths_agree_absolute_and_relative_damping():
    """With ``G = cI`` an absolute λ equals a relative one: the per-row kept-support
    solve (absolute damping) and the shared pruned-set solve (relative) must agree."""
    g = torch.Generator().manual_seed(2)
    model = nn.Linear(12, 6).double()
    a = torch.randn(13, 13, generator=g, dtype=torch.float64)
    A = a @ a.T / 13
    c, lam = 3.0, 0.2
    layout = ff.ParamLayout.from_model(model)
    group = {"l": ff.KronGroup("weight", "bias")}
    F = ff.KFAC(group, {"l": A}, {"l": c * torch.eye(6, dtype=torch.float64)}, layout)
    rel = lam / (c * float(A.diagonal().mean()))
    absolute, relative = copy.deepcopy(model), copy.deepcopy(model)
    m1 = ff.apps.prune(absolute, F, 0.4, method="obs", damping=lam)
    m2 = ff.apps.prune(relative, F, 0.4, method="obs", rel_damping=rel)
    assert torch.equal(m1["weight"], m2["weight"])
    torch.testing.assert_close(absolute.weight, relative.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(absolute.bias, relative.bias, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["obs", "sparsegpt"])
def test_kfac_row_scope_and_nm_depend_on_the_input_factor_alone(method):
    """Per-row scope and N:M compare weights within a row, whose H is ``G_rr A + λ_r I``
    with ``λ_r = rel · G_rr · mean(diag A)``: ``G_rr`` scales the row's saliencies and
    cancels in its compensation, so any positive output factor gives the same result."""
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(8, 5, bias=False).double()
    a = torch.randn(40, 8, generator=g, dtype=torch.float64)
    layout = ff.ParamLayout.from_model(model)
    group = {"l": ff.KronGroup("weight", None)}
    b = torch.randn(5, 5, generator=g, dtype=torch.float64)
    outputs = [torch.eye(5, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(5, dtype=torch.float64)]
    for pattern, sparsity, scope in [("unstructured", 0.6, "row"), ("2:4", None, "layer")]:
        results = []
        for G in outputs:
            m = copy.deepcopy(model)
            F = ff.KFAC(group, {"l": a.T @ a}, {"l": G}, layout)
            keep = ff.apps.prune(
                m, F, sparsity, pattern=pattern, method=method, scope=scope, rel_damping=0.01
            )
            results.append((keep["weight"], m.weight.detach()))
        assert torch.equal(results[0][0], results[1][0])
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)
