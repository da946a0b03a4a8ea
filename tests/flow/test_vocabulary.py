"""One likelihood vocabulary across estimation, flow and stats; one autograd implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fisherflow.estimation import LIKELIHOODS
from fisherflow.flow import ALIASES, FAMILIES, OnlineGLM, score_and_information
from fisherflow.matrices import ParamLayout
from fisherflow.stats import empirical_fisher, observed_information

DT = torch.float64


def test_flow_families_use_the_estimation_names():
    shared = {"gaussian", "bernoulli", "poisson"}
    assert shared <= set(LIKELIHOODS) and shared <= set(FAMILIES)
    assert ALIASES == {"logistic": "bernoulli"} and "logistic" not in FAMILIES
    for name, family in FAMILIES.items():
        assert family.name == name


def test_logistic_is_an_alias_of_bernoulli():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = (rng.random(200) < 1 / (1 + np.exp(-X @ np.array([1.0, -1.0])))).astype(float)
    alias = OnlineGLM("logistic").partial_fit(X, y).refine([(X, y)])
    canonical = OnlineGLM("bernoulli").partial_fit(X, y).refine([(X, y)])
    assert OnlineGLM().family.name == "bernoulli"  # the default
    assert alias.family is canonical.family and alias.family.name == "bernoulli"
    np.testing.assert_array_equal(alias.params, canonical.params)
    np.testing.assert_array_equal(alias.bse, canonical.bse)
    assert alias.information.likelihood == "bernoulli"
    with pytest.raises(ValueError, match=r"family must be one of .*aliases.*'logistic'"):
        OnlineGLM("logit")


def _logistic_ll(theta, data):
    X, y = data
    eta = X @ theta
    return y * eta - torch.nn.functional.softplus(eta)


@pytest.mark.parametrize(
    ("kind", "reference"), [("observed", observed_information), ("empirical", empirical_fisher)]
)
def test_flow_autograd_is_stats_likelihood(kind, reference):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 3, generator=g, dtype=DT)
    y = torch.bernoulli(torch.full((50,), 0.4, dtype=DT), generator=g)
    theta = torch.randn(3, generator=g, dtype=DT)
    layout = ParamLayout.from_shapes({"beta": (3,)})
    data = (X, y)
    score, info = score_and_information(_logistic_ll, theta, data, layout=layout, information=kind)
    want = reference(_logistic_ll, theta, (X, y))
    torch.testing.assert_close(info.to_dense(), 0.5 * (want + want.T), rtol=0, atol=0)
    mu = torch.sigmoid(X @ theta)
    torch.testing.assert_close(score, X.T @ (y - mu))
