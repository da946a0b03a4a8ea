"""Laplace on a linear-Gaussian model is exact: conjugate posterior, evidence, predictive.

And with any structure, the predictive equals the dense formula with that structure's
``to_dense()``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fisherflow as ff

D, N, SIGMA, TAU = 3, 20, 0.7, 2.0


@pytest.fixture
def linear_gaussian():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = X @ w_true + SIGMA * torch.randn(N, generator=gen, dtype=torch.float64)
    precision = X.T @ X / SIGMA**2 + TAU * torch.eye(D, dtype=torch.float64)
    w_map = torch.linalg.solve(precision, X.T @ y / SIGMA**2)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_map[None])
    return model, X, y, precision, w_map


def _fit(model, X, y, structure="dense", tau=TAU):
    la = ff.Laplace(
        model, likelihood="gaussian", structure=structure, sigma_noise=SIGMA, prior_precision=tau
    )
    return la.fit([(X, y[:, None])], progress=False)


def test_posterior_is_the_conjugate_posterior(linear_gaussian):
    model, X, y, precision, w_map = linear_gaussian
    la = _fit(model, X, y)
    torch.testing.assert_close(la.mean, w_map)
    torch.testing.assert_close(la.posterior_precision.to_dense(), precision)
    cov = torch.linalg.inv(precision)
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(la.posterior_precision.solve(eye), cov)
    torch.testing.assert_close(la.posterior_precision.covariance_diagonal(), cov.diagonal())
    # samples: mean and covariance within Monte Carlo error (seeded)
    draws = la.sample(20000, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (20000, D)
    torch.testing.assert_close(
        draws.mean(0), w_map, atol=4 * cov.diagonal().max().sqrt() / 141, rtol=0
    )
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=0.05 * cov.abs().max(), rtol=0)


def test_log_marginal_likelihood_is_the_closed_form_evidence(linear_gaussian):
    model, X, y, _, _ = linear_gaussian
    la = _fit(model, X, y)
    cov = SIGMA**2 * torch.eye(N, dtype=torch.float64) + X @ X.T / TAU
    exact = torch.distributions.MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov)
    torch.testing.assert_close(la.log_marginal_likelihood(), exact.log_prob(y))
    # log p(D | θ*) with the Gaussian's normalising constant
    resid = y - X @ la.mean
    expected = -0.5 * (resid**2).sum() / SIGMA**2 - N * math.log(SIGMA * math.sqrt(2 * math.pi))
    assert la.loglik == pytest.approx(float(expected), rel=1e-12)


def test_glm_predictive_variance_is_x_sigma_x(linear_gaussian):
    model, X, y, precision, w_map = linear_gaussian
    la = _fit(model, X, y)
    x = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mean, var = la.predict(x, method="glm")
    cov = torch.linalg.inv(precision)
    torch.testing.assert_close(mean, (x @ w_map)[:, None])
    torch.testing.assert_close(var, torch.einsum("nd,de,ne->n", x, cov, x)[:, None])
    # the mc predictive agrees within Monte Carlo error
    mc_mean, mc_var = la.predict(
        x, method="mc", n_samples=1000, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(mc_var, var, rtol=0.25, atol=0)
    torch.testing.assert_close(mc_mean, mean, atol=0.1, rtol=0)


def test_marglik_tuning_maximises_the_evidence(linear_gaussian):
    model, X, y, _, _ = linear_gaussian
    la = _fit(model, X, y)
    tau = la.optimize_prior_precision("marglik")
    best = float(la.log_marginal_likelihood())
    for factor in (0.9, 1.1):
        assert float(la.log_marginal_likelihood(tau * factor)) < best
    # the fixed-θ* evidence as a function of τ, brute force on a grid
    grid = torch.logspace(-2, 2, 401, dtype=torch.float64)
    values = torch.stack([la.log_marginal_likelihood(t) for t in grid])
    assert float(values.max()) <= best + 1e-9


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("structure", ["diagonal", "kfac", "ekfac", "block", "lowrank"])
@pytest.mark.parametrize("params", [None, "last_layer"])
def test_structured_predictive_matches_its_dense_formula(structure, params):
    torch.manual_seed(0)
    model = _MLP().double()
    X = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    la = ff.Laplace(
        model, likelihood="categorical", structure=structure, params=params, prior_precision=0.5
    )
    la.fit([(X, y)], progress=False, rank=5)
    if params == "last_layer":
        assert la.names == ["head.weight", "head.bias"]
    x = torch.randn(7, 4, dtype=torch.float64)
    J, out = la.jacobians(x)
    Sigma = torch.linalg.inv(
        la.fisher.to_dense() + 0.5 * torch.eye(la.layout.size, dtype=torch.float64)
    )
    expected = torch.einsum("nkp,pq,nlq->nkl", J, Sigma, J)
    mean, cov, _ = la.glm_predictive(x)
    torch.testing.assert_close(cov, expected)
    torch.testing.assert_close(mean, out)
    probit = la.predict(x, method="probit")
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * expected.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(probit, torch.softmax(kappa * out, -1))
    torch.testing.assert_close(
        la.posterior_precision.logdet(), torch.logdet(torch.linalg.inv(Sigma))
    )


def test_glm_predictive_in_chunks_equals_one_pass(monkeypatch):
    from fisherflow.uncertainty import laplace as module

    torch.manual_seed(1)
    model = _MLP().double()
    X = torch.randn(10, 4, dtype=torch.float64)
    la = ff.Laplace(model, likelihood="categorical", structure="kfac")
    la.fit([(X, torch.randint(0, 3, (10,)))], progress=False)
    whole = la.glm_predictive(X)
    monkeypatch.setattr(module, "_JACOBIAN_ENTRIES", 3 * la.layout.size)  # 3 rows a chunk
    parts = la.glm_predictive(X)
    assert parts[2] == whole[2] == (10, 3)
    torch.testing.assert_close(parts[0], whole[0])
    torch.testing.assert_close(parts[1], whole[1])
