"""The Jacobian-free ``J Σ Jᵀ`` of K-FAC/EKFAC posteriors equals the dense formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff
from fisherflow.uncertainty import kronecker

LIKELIHOODS = {"categorical": 4, "gaussian": 2, "bernoulli": 1}


def _data(likelihood: str, c: int, n: int = 16):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    if likelihood == "categorical":
        y = torch.randint(0, c, (n,), generator=gen)
    elif likelihood == "bernoulli":
        y = torch.randint(0, 2, (n, 1), generator=gen).double()
    else:
        y = torch.randn(n, c, generator=gen, dtype=torch.float64)
    return X, y


def _dense(la: ff.Laplace, x: torch.Tensor) -> torch.Tensor:
    """``J Σ Jᵀ`` with ``Σ`` the inverse of the posterior precision's ``to_dense()``."""
    J, _ = la.jacobians(x)
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    return torch.einsum("rkp,pq,rlq->rkl", J, sigma, J)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
@pytest.mark.parametrize("params", [None, "last_layer"])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_equals_dense(structure, likelihood, params, bias, monkeypatch):
    torch.manual_seed(0)
    c = LIKELIHOODS[likelihood]
    model = nn.Sequential(nn.Linear(3, 5, bias=bias), nn.Tanh(), nn.Linear(5, c, bias=bias))
    X, y = _data(likelihood, c)
    la = ff.Laplace(
        model.double(),
        likelihood=likelihood,
        structure=structure,
        params=params,
        prior_precision=0.7,
        temperature=1.3,
    )
    la.fit([(X, y)], progress=False)
    x = X[:7]
    expected = _dense(la, x)

    def no_jacobians(*args, **kwargs):  # every layer must take the fast path
        raise AssertionError("the Jacobian path was used")

    monkeypatch.setattr(kronecker, "output_jacobians", no_jacobians)
    mean, cov, shape = la.glm_predictive(x)
    assert shape == (7, c)
    torch.testing.assert_close(cov, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean, model(x).detach())


def test_per_layer_prior_and_fallback_part():
    """A LayerNorm (no Kronecker factors) goes through Jacobians, per-layer priors apply."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = _data("categorical", 3)
    la = ff.Laplace(model, likelihood="categorical", structure="kfac")
    la.fit([(X, y)], progress=False)
    la.prior_precision = torch.linspace(0.5, 2.0, len(la.prior_groups), dtype=torch.float64)
    x = X[:5]
    _, cov, _ = la.glm_predictive(x, batch_size=2)
    torch.testing.assert_close(cov, _dense(la, x), rtol=1e-10, atol=1e-12)
    probs = la.predict(x, method="probit", batch_size=3)
    torch.testing.assert_close(probs, la.predict(x, method="probit"))


def test_large_output_rest_is_diagonal_part():
    """A large output layer kept diagonal (the Fisher's rest) joins through Jacobians."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).double()
    X, y = _data("categorical", 6)
    la = ff.Laplace(model, likelihood="categorical", structure="ekfac")
    with pytest.warns(ff.uncertainty.LargeOutputNotice):
        la.fit([(X, y)], progress=False, large_output=5)
    x = X[:4]
    _, cov, _ = la.glm_predictive(x)
    torch.testing.assert_close(cov, _dense(la, x), rtol=1e-10, atol=1e-12)


def test_resolve_settles_last_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = _data("categorical", 2)
    fisher = ff.estimate(
        model,
        [(X, y)],
        "categorical",
        "exact",
        "kfac",
        params=["2.weight", "2.bias"],
        progress=False,
    )
    la = ff.Laplace(model, likelihood="categorical", fisher=fisher, params="last_layer")
    with pytest.raises(ValueError, match="resolve"):
        _ = la.layout
    assert la.resolve(X) is la
    assert la.names == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="batch_size"):
        la.predict(X, batch_size=0)
