"""log p(D | θ*) from the Fisher pass's forwards equals the separate pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff
from fisherflow.uncertainty import laplace_state
from fisherflow.uncertainty.loglik import FusedLogLikelihood, log_likelihood


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(60, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    return model, [(x[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]


def test_fused_pass_equals_the_separate_pass(monkeypatch):
    model, data = _case()
    la = ff.Laplace(model, likelihood="categorical", structure="kfac", prior_precision=1.0)
    expected = log_likelihood(model, data, la.likelihood, la.forward, False)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the fused log-likelihood should have been used")

    monkeypatch.setattr(laplace_state, "log_likelihood", no_second_pass)
    la.temperature = 0.5
    la.fit(data, progress=False)
    assert la.n_data == expected[1] == 60
    assert la.loglik == pytest.approx(expected[0] / 0.5, rel=1e-13)


@pytest.mark.parametrize("structure", ["ekfac", "diagonal"])
def test_two_passes_or_any_structure_give_the_same_number(structure):
    model, data = _case()
    la = ff.Laplace(model, likelihood="categorical", structure=structure, prior_precision=1.0)
    la.fit(data, progress=False)
    expected = log_likelihood(model, data, la.likelihood, la.forward, False)
    assert la.loglik == pytest.approx(expected[0], rel=1e-13)
    assert la.n_data == expected[1]


def test_unpaired_forwards_are_detected():
    model, data = _case()
    lik = ff.Laplace(model, likelihood="categorical", prior_precision=1.0).likelihood
    fused = FusedLogLikelihood(data, lik, lambda m, x: m(x))
    drawn = iter(fused.data)
    first = next(drawn)
    fused.forward(model, first[0])
    assert fused.result() is not None
    fused.forward(model, first[0])  # a repeated forward of the same batch
    assert fused.result() is None
    fused = FusedLogLikelihood(data, lik, lambda m, x: m(x))
    for _ in range(2):  # a second pass over the data
        for item in fused.data:
            fused.forward(model, item[0])
    assert fused.result() is None
    assert len(fused.data) == 3  # type: ignore[arg-type]
