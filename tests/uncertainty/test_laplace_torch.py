"""Agreement with laplace-torch 0.3 on an MLP (float64): predictive and evidence.

Same structure, prior and data: the GLM probit and Laplace-bridge predictive
probabilities agree to 1e-7 (observed: ~1e-16 for probit, ≤ 5e-9 for the bridge,
which divides by small variances) and the log marginal likelihood to a relative 1e-8, last-layer and
all-weights. laplace-torch's K-FAC keeps a bias as its own block (``G`` alone) where
fisherflow's joins it to the weight (``[W b]``, input factor augmented by the constant
1), so K-FAC is compared on bias-free layers, where the two are the same matrix.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fisherflow as ff

laplace = pytest.importorskip("laplace")

CASES = [("full", "dense", True), ("diag", "diagonal", True), ("kron", "kfac", False)]


@pytest.mark.parametrize(("theirs", "ours", "bias"), CASES)
@pytest.mark.parametrize(("subset", "params"), [("last_layer", "last_layer"), ("all", None)])
def test_agrees_with_laplace_torch(theirs, ours, bias, subset, params):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias))
    model = model.double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(X, y), batch_size=20)
    x = torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # laplace-torch's own deprecation warnings
        lt = laplace.Laplace(
            model,
            "classification",
            subset_of_weights=subset,
            hessian_structure=theirs,
            prior_precision=0.7,
        )
        lt.fit(loader)
        expected = {link: lt(x, pred_type="glm", link_approx=link) for link in ("probit", "bridge")}
        evidence = lt.log_marginal_likelihood()
    la = ff.Laplace(
        model, likelihood="categorical", structure=ours, params=params, prior_precision=0.7
    )
    la.fit(list(loader), progress=False)
    for link, probs in expected.items():
        torch.testing.assert_close(la.predict(x, method=link), probs, atol=1e-7, rtol=0)
    assert float(la.log_marginal_likelihood()) == pytest.approx(float(evidence), rel=1e-8)
