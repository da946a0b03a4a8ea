"""Per-layer priors, prior tuning by evidence and by validation, other likelihoods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff


def _fitted(structure="kfac", likelihood="categorical", out=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)).double()
    X = torch.randn(30, 4, dtype=torch.float64)
    y = (
        torch.randint(0, out, (30,))
        if likelihood == "categorical"
        else torch.randint(0, 2, (30, out)).double()
    )
    la = ff.Laplace(model, likelihood=likelihood, structure=structure)
    return la.fit([(X, y)], progress=False), X, y


def test_per_layer_prior_is_a_block_damping():
    la, X, _ = _fitted("kfac")
    groups = la.prior_groups
    assert groups == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    tau = torch.tensor([0.3, 2.0], dtype=torch.float64)
    la.prior_precision = tau
    sizes = [la.layout.indices(g).numel() for g in groups]
    D = torch.diag(torch.repeat_interleave(tau, torch.tensor(sizes)))
    dense = la.fisher.to_dense() + D
    torch.testing.assert_close(la.posterior_precision.to_dense(), dense)
    torch.testing.assert_close(la.posterior_precision.logdet(), torch.logdet(dense))
    J, _ = la.jacobians(X[:5])
    expected = torch.einsum("nkp,pq,nlq->nkl", J, torch.linalg.inv(dense), J)
    torch.testing.assert_close(la.functional_variance(J), expected)
    draws = la.sample(3, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (3, la.layout.size)


def test_layerwise_marglik_beats_scalar():
    la, _, _ = _fitted("kfac")
    scalar = la.optimize_prior_precision("marglik")
    assert scalar.dim() == 0
    best_scalar = float(la.log_marginal_likelihood())
    layerwise = la.optimize_prior_precision("marglik", prior_structure="layerwise")
    assert layerwise.shape == (2,)
    assert float(la.log_marginal_likelihood()) >= best_scalar - 1e-9
    # a stationary point: nudging any layer's τ lowers the evidence
    for i in range(2):
        for f in (0.95, 1.05):
            moved = layerwise.clone()
            moved[i] *= f
            assert float(la.log_marginal_likelihood(moved)) < float(la.log_marginal_likelihood())


def test_val_tuning_picks_the_grid_minimum():
    la, X, y = _fitted("diagonal")
    val = [(X[:15], y[:15])]
    grid = torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64)
    chosen = la.optimize_prior_precision("val", val_data=val, grid=grid)
    nll = []
    for t in grid:
        la.prior_precision = t
        p = la.predict(X[:15], method="probit")
        nll.append(float(-p.gather(1, y[:15, None]).log().sum()))
    assert float(chosen) == float(grid[int(torch.tensor(nll).argmin())])


def test_bernoulli_methods_agree():
    la, X, _ = _fitted("dense", likelihood="bernoulli", out=2)
    gen = torch.Generator().manual_seed(0)
    glm = la.predict(X[:4], method="glm", n_samples=20000, generator=gen)
    probit = la.predict(X[:4], method="probit")
    assert glm.shape == probit.shape == (4, 2)
    torch.testing.assert_close(glm, probit, atol=0.02, rtol=0)  # probit approximation error
    # a narrow posterior: the network and its linearisation give the same predictive
    la.prior_precision = 200.0
    glm = la.predict(X[:4], method="glm", n_samples=20000, generator=gen)
    mc = la.predict(X[:4], method="mc", n_samples=400, generator=gen)
    torch.testing.assert_close(mc, glm, atol=0.01, rtol=0)


def test_large_output_layer_is_kept_diagonal():
    from fisherflow.uncertainty.fitting import LargeOutputNotice

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5)).double()
    X = torch.randn(20, 4, dtype=torch.float64)
    data = [(X, torch.randint(0, 5, (20,)))]
    la = ff.Laplace(model, likelihood="categorical", structure="kfac")
    with pytest.warns(LargeOutputNotice, match="more than 4 outputs"):
        la.fit(data, progress=False, large_output=4)
    F = la.fisher
    assert isinstance(F, ff.KFAC) and list(F.kron_groups) != []
    assert F.rest_names == ["2.weight", "2.bias"]
    exact_diag = ff.estimate(
        model,
        data,
        "categorical",
        "exact",
        "diagonal",
        params=["2.weight", "2.bias"],
        progress=False,
    )
    torch.testing.assert_close(
        F.block("2.weight").diagonal(), exact_diag.block("2.weight").diagonal()
    )
    kfac = ff.estimate(
        model, data, "categorical", "exact", "kfac", params=["0.weight", "0.bias"], progress=False
    )
    torch.testing.assert_close(F.block(next(iter(F.kron_groups))).to_dense(), kfac.to_dense())
    # last layer only: a K-FAC with no Kronecker group, the diagonal in its rest
    la = ff.Laplace(model, likelihood="categorical", structure="kfac", params="last_layer")
    with pytest.warns(LargeOutputNotice):
        la.fit(data, progress=False, large_output=4)
    assert la.fisher.kron_groups == {}
    assert la.predict(X[:3], method="probit").shape == (3, 5)


def test_predictive_samples_average_to_the_predictive():
    la, X, _ = _fitted("kfac")
    draws = la.predictive_samples(X[:4], 50, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (50, 4, 3)
    probs = la.predict(
        X[:4], method="glm", n_samples=50, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(draws.mean(0), probs)
    mc = la.predictive_samples(X[:4], 5, method="mc", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        mc.mean(0),
        la.predict(X[:4], method="mc", n_samples=5, generator=torch.Generator().manual_seed(0)),
    )
    with pytest.raises(ValueError, match="method must be one of"):
        la.predictive_samples(X[:4], method="probit")


def test_setting_the_temperature_after_fit_keeps_the_evidence_consistent():
    la, X, y = _fitted("kfac")
    la.temperature = 0.25
    fresh = ff.Laplace(la.model, likelihood="categorical", temperature=0.25)
    fresh.fit([(X, y)], progress=False)
    assert fresh.loglik == pytest.approx(la.loglik, rel=1e-12)
    for tau in (0.1, 3.0):
        torch.testing.assert_close(
            la.log_marginal_likelihood(tau), fresh.log_marginal_likelihood(tau)
        )
    with pytest.raises(ValueError, match="temperature"):
        la.temperature = -1.0
