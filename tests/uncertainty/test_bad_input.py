"""Bad input to ``ff.Laplace`` gives clear errors naming the rule and the value."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fisherflow as ff


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data():
    X = torch.randn(8, 3, dtype=torch.float64)
    return [(X, torch.randint(0, 2, (8,)))]


def test_layout_mismatch():
    model = _model()
    other = nn.Linear(3, 5).double()
    F = ff.estimate(other, _data(), "categorical", "exact", "kfac", progress=False)
    with pytest.raises(ValueError, match="does not have|does not match"):
        ff.Laplace(model, likelihood="categorical", fisher=F)
    # right names, wrong shapes
    F = ff.estimate(
        nn.Sequential(nn.Linear(3, 5)).double(),
        _data(),
        "categorical",
        "exact",
        "diagonal",
        progress=False,
    )
    with pytest.raises(ValueError, match="does not match"):
        ff.Laplace(model, likelihood="categorical", fisher=F)
    # a Fisher over all weights given for the last layer
    F = ff.estimate(model, _data(), "categorical", "exact", "diagonal", progress=False)
    la = ff.Laplace(model, likelihood="categorical", fisher=F, params="last_layer")
    with pytest.raises(ValueError, match="does not match"):
        la.predict(_data()[0][0])


def test_likelihood_mismatch():
    model = _model()
    F = ff.estimate(model, _data(), "categorical", "exact", "diagonal", progress=False)
    with pytest.raises(ValueError, match="likelihood 'categorical'"):
        ff.Laplace(model, likelihood="bernoulli", fisher=F)


@pytest.mark.parametrize("tau", [-1.0, 0.0, math.nan, math.inf, [1.0, -2.0]])
def test_bad_prior_precision(tau):
    with pytest.raises(ValueError, match="prior_precision must be finite and > 0"):
        ff.Laplace(_model(), likelihood="categorical", prior_precision=tau)
    la = ff.Laplace(_model(), likelihood="categorical")
    with pytest.raises(ValueError, match="prior_precision"):
        la.prior_precision = tau


@pytest.mark.parametrize(("name", "value"), [("sigma_noise", 0.0), ("temperature", -1.0)])
def test_bad_scalars(name, value):
    with pytest.raises(ValueError, match=f"{name} must be finite and > 0"):
        ff.Laplace(_model(), likelihood="gaussian", **{name: value})


def test_predict_before_fit():
    la = ff.Laplace(_model(), likelihood="categorical")
    x = _data()[0][0]
    with pytest.raises(ValueError, match="call fit"):
        la.predict(x)
    with pytest.raises(ValueError, match="call fit"):
        la.sample(3)


def test_evidence_needs_the_log_likelihood():
    model = _model()
    F = ff.estimate(model, _data(), "categorical", "exact", "kfac", progress=False)
    la = ff.Laplace(model, likelihood="categorical", fisher=F)
    assert la.predict(_data()[0][0]).shape == (8, 2)  # works without fit
    with pytest.raises(ValueError, match="fit"):
        la.log_marginal_likelihood()
    la.fit(_data(), progress=False)
    assert la.fisher is F  # a given Fisher is kept
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize(
    ("likelihood", "method"),
    [("gaussian", "probit"), ("gaussian", "bridge"), ("bernoulli", "bridge"), ("categorical", "x")],
)
def test_method_the_likelihood_does_not_support(likelihood, method):
    la = ff.Laplace(_model(), likelihood=likelihood)
    with pytest.raises(ValueError, match="method must be one of"):
        la.predict(_data()[0][0], method=method)


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ff.Laplace("model", likelihood="categorical")
    with pytest.raises(ValueError, match="structure must be one of"):
        ff.Laplace(_model(), likelihood="categorical", structure="full")
    with pytest.raises(ValueError, match="kind must be one of"):
        ff.Laplace(_model(), likelihood="categorical", kind="fisher")
    with pytest.raises(ValueError, match="params must be"):
        ff.Laplace(_model(), likelihood="categorical", params="all_layers").fit(_data())
    with pytest.raises(ValueError, match="unknown"):
        ff.Laplace(_model(), likelihood="categorical", params=["nope"]).fit(_data())
    with pytest.raises(TypeError, match="FisherMatrix"):
        ff.Laplace(_model(), likelihood="categorical", fisher=torch.eye(3))
    la = ff.Laplace(_model(), likelihood="categorical", structure="dense").fit(
        _data(), progress=False
    )
    with pytest.raises(ValueError, match="per-layer prior_precision"):
        la.prior_precision = torch.ones(4)
        la.predict(_data()[0][0])
    with pytest.raises(ValueError, match="re-iterable"):
        la.fit(iter(_data()))
    with pytest.raises(ValueError, match="val_data"):
        la.optimize_prior_precision("val")
    with pytest.raises(ValueError, match="method must be one of"):
        la.optimize_prior_precision("grid")
