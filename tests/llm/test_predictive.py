"""Next-token predictive NLL, temperature selection on held-out tokens, interval reliability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff
from tests.llm.test_intervals import CONTEXTS, V, _fit_mle, _truth


def _draws(probs, n, seed):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, CONTEXTS, (n,), generator=gen)
    return ctx[None], torch.multinomial(probs[ctx], 1, generator=gen)[:, 0][None]


def _posterior(structure="kfac", n=150, seed=0, tau=1e-2, temperature=1.0):
    features, probs = _truth(0)
    model, data = _fit_mle(features, probs, n, seed=seed)
    la = ff.Laplace(
        model,
        likelihood="categorical",
        structure=structure,
        params="last_layer",
        prior_precision=tau,
        temperature=temperature,
    ).fit(data, progress=False)
    return la, probs


@pytest.mark.parametrize("structure", ["kfac", "diagonal"])
def test_fast_nll_equals_the_jacobian_path(structure):
    la, probs = _posterior(structure, temperature=0.5, tau=0.3)
    F = la.fisher
    ref = ff.Laplace(
        la.model,
        likelihood="categorical",
        fisher=ff.Dense(F.to_dense(), F.layout, **F.meta),
        params="last_layer",
        prior_precision=0.3,
        temperature=0.5,
    )
    ctx, nxt = _draws(probs, 200, 1)
    fast = ff.llm.next_token_nll(la, ctx, targets=nxt)
    slow = ff.llm.next_token_nll(ref, ctx, targets=nxt)
    assert fast.shape == (200,)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)
    # by hand: the zero-sum projection of the dense logit covariance, then the probit
    mean, cov, _ = ref.glm_predictive(ctx)
    P = torch.eye(V, dtype=cov.dtype) - 1.0 / V
    var = (P @ cov @ P).diagonal(dim1=-2, dim2=-1)
    z = (P @ mean.T).T / torch.sqrt(1 + torch.pi / 8 * var)
    want = -torch.log_softmax(z, -1).gather(1, nxt.reshape(-1, 1))[:, 0]
    torch.testing.assert_close(fast, want, rtol=1e-9, atol=1e-12)


def test_vanishing_temperature_gives_the_map_nll_and_shifted_targets():
    la, probs = _posterior()
    ctx, nxt = _draws(probs, 100, 2)
    la.temperature = 1e-12
    torch.testing.assert_close(
        ff.llm.next_token_nll(la, ctx, targets=nxt),
        ff.llm.next_token_nll(la, ctx, targets=nxt, method="map"),
        rtol=1e-6,
        atol=1e-9,
    )
    # default targets: input_ids shifted by one position, the last one not counted
    ids = torch.tensor([[0, 3, 1, 4]])
    explicit = ff.llm.next_token_nll(la, ids, targets=torch.tensor([[3, 1, 4, -100]]))
    shifted = ff.llm.next_token_nll(la, ids)
    assert shifted.shape == (3,)
    torch.testing.assert_close(shifted, explicit)


def test_held_out_temperature_is_the_grid_argmin_and_generalises():
    """Selected on one held-out split, the predictive beats the MAP on another (3 seeds)."""
    grid = torch.logspace(-3, 3, 7, dtype=torch.float64)
    gains = []
    for seed in range(3):
        la, probs = _posterior(n=150, seed=10 + seed)
        val_ctx, val_nxt = _draws(probs, 2000, 100 + seed)
        test_ctx, test_nxt = _draws(probs, 2000, 200 + seed)
        brute = []
        for t in grid.tolist():
            la.temperature = t
            brute.append(float(ff.llm.next_token_nll(la, val_ctx, targets=val_nxt).mean()))
        la.temperature = 1.0
        # the library's shifted-target search on (context, next) pairs laid out as rows
        rows = torch.stack([val_ctx[0], val_nxt[0]], 1)  # token 0 then its next token
        found = ff.llm.optimize_temperature(la, rows, grid=grid, progress=False)
        assert found.temperature == pytest.approx(float(grid[torch.tensor(brute).argmin()]))
        assert la.temperature == found.temperature
        torch.testing.assert_close(found.scores[:, 0], torch.tensor(brute, dtype=torch.float64))
        bayes = ff.llm.next_token_nll(la, test_ctx, targets=test_nxt).mean()
        plain = ff.llm.next_token_nll(la, test_ctx, targets=test_nxt, method="map").mean()
        gains.append(float(plain - bayes))
    assert min(gains) > -0.005 and sum(gains) > 0.01, gains


def test_joint_and_marglik_searches():
    la, probs = _posterior()
    ids = torch.stack(_draws(probs, 300, 3), -1)[0]  # (300, 2) rows: context, next
    taus = torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64)
    grid = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    joint = ff.llm.optimize_temperature(
        la, ids, grid=grid, prior_precision=taus, batch_size=64, progress=False
    )
    assert joint.scores.shape == (3, 3)
    i, j = divmod(int(joint.scores.argmin()), 3)
    assert joint.temperature == float(grid[i])
    assert float(la.prior_precision) == float(taus[j])
    evid = ff.llm.optimize_temperature(
        la, ids, grid=grid, prior_precision="marglik", progress=False
    )
    la.temperature = evid.temperature
    best_tau = float(la.optimize_prior_precision("marglik"))
    assert float(evid.prior_precision) == pytest.approx(best_tau, rel=1e-6)


def test_laplace_optimize_temperature_on_a_classifier_and_bad_input():
    torch.manual_seed(0)
    x = torch.randn(200, 3, dtype=torch.float64)
    y = (x @ torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64) > 0).long()
    model = nn.Sequential(nn.Linear(3, 2)).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=50)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:100]), y[:100]) + 1e-3 * sum(
            p.square().sum() for p in model.parameters()
        )
        loss.backward()
        return loss

    opt.step(closure)
    la = ff.Laplace(model, likelihood="categorical", structure="dense", prior_precision=0.1)
    la.fit([(x[:100], y[:100])], progress=False)
    val = [(x[100:], y[100:])]
    grid = torch.logspace(-2, 2, 5, dtype=torch.float64)
    brute = []
    for t in grid.tolist():
        la.temperature = t
        p = la.predict(x[100:], method="probit")
        brute.append(float(-p.gather(1, y[100:, None]).log().sum()))
    la.temperature = 1.0
    found = la.optimize_temperature(val, grid=grid)
    assert found.temperature == float(grid[torch.tensor(brute).argmin()])
    torch.testing.assert_close(found.scores[:, 0], torch.tensor(brute, dtype=torch.float64))
    la.temperature = 1.0
    with pytest.raises(ValueError, match="temperatures must be finite"):
        la.optimize_temperature(val, grid=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="prior_precision must be None"):
        la.optimize_temperature(val, prior_precision="evidence")
    with pytest.raises(ValueError, match="prior_precision must be finite"):
        la.optimize_temperature(val, prior_precision=torch.tensor([1.0, float("nan")]))
    assert la.temperature == 1.0 and float(la.prior_precision) == pytest.approx(0.1)


def test_llm_bad_input():
    la, _ = _posterior()
    with pytest.raises(ValueError, match="method must be one of"):
        ff.llm.next_token_nll(la, torch.tensor([[0, 1]]), method="mc")
    with pytest.raises(ValueError, match="targets must be given"):
        ff.llm.next_token_nll(la, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="input_ids must be a"):
        ff.llm.optimize_temperature(la, torch.tensor([[0]]), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        ff.llm.optimize_temperature(la, torch.tensor([[0, 1]]), batch_size=0, progress=False)


def test_interval_reliability_against_a_loop():
    la, probs = _posterior(n=400)
    ctx, nxt = _draws(probs, 3000, 5)
    iv = ff.llm.token_intervals(la, ctx, top_k=3)
    out = ff.llm.interval_reliability(iv, nxt, n_bins=4)
    mean = iv.mean.reshape(-1, 3).reshape(-1).double()
    hit = (iv.token_ids == nxt[..., None]).reshape(-1).double()
    order = mean.argsort()
    for b, idx in enumerate(order.tensor_split(4)):
        assert out["count"][b] == idx.numel()
        assert out["observed"][b] == pytest.approx(float(hit[idx].mean()))
        assert out["lower"][b] == pytest.approx(float(iv.lower.reshape(-1)[idx].double().mean()))
        assert out["upper"][b] == pytest.approx(float(iv.upper.reshape(-1)[idx].double().mean()))
    # well-specified model, T = 1: the observed frequency lies in the mean interval
    assert float(out["inside"].mean()) >= 0.75
    with pytest.raises(ValueError, match="targets must be shaped"):
        ff.llm.interval_reliability(iv, nxt[0])
    with pytest.raises(ValueError, match="n_bins"):
        ff.llm.interval_reliability(iv, nxt, n_bins=0)
