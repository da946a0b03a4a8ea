"""OOD scores equal their formulas (dense brute force, float64); AUROC/FPR@95 match sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call, jacrev

import fisherflow as ff
from fisherflow.uncertainty.ood import HIGHER_IS_OOD, fpr_at_tpr, ood_metrics
from fisherflow.uncertainty.predictive import sample_outputs

TAU, TEMP, S = 0.7, 0.5, 64


def _setup(out_dim=3, structure="dense", likelihood="categorical"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out_dim)).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, max(out_dim, 2), (10,))
    y = y.double()[:, None] if likelihood == "bernoulli" else y
    F = ff.estimate(model, [(X, y)], likelihood, "exact", structure, progress=False)
    la = ff.Laplace(model, likelihood=likelihood, fisher=F, prior_precision=TAU, temperature=TEMP)
    return model, la, F


def _dense(model, F, x):
    """Mean logits, J Σ Jᵀ and the per-input parameter Jacobians, by brute force."""
    names = list(F.layout.names)
    params = {n: p.detach() for n, p in model.named_parameters()}
    P = F.layout.size
    sigma = torch.linalg.inv(F.to_dense() / TEMP + TAU * torch.eye(P, dtype=torch.float64))

    def f(theta, xi):
        return functional_call(model, F.layout.unflatten(theta), (xi[None],))[0]

    theta = F.layout.flatten({n: params[n] for n in names})
    J = torch.stack([jacrev(f)(theta, xi) for xi in x])  # (N, C, P)
    with torch.no_grad():
        mean = model(x)
    return mean, J @ sigma @ J.transpose(1, 2), sigma, theta, f


def test_scores_equal_their_formulas_dense():
    model, la, F = _setup()
    x = torch.randn(7, 3, dtype=torch.float64) * 2
    scores = ff.uncertainty.ood_scores(
        la, x, n_samples=S, batch_size=3, generator=torch.Generator().manual_seed(5)
    )
    mean, cov, sigma, theta, f = _dense(model, F, x)
    # same draws: the chunks of 3 rows draw in order from one generator
    gen = torch.Generator().manual_seed(5)
    draws = torch.cat(
        [sample_outputs(mean[i : i + 3], cov[i : i + 3], S, gen) for i in range(0, 7, 3)], 1
    )
    p = torch.softmax(draws, -1).numpy()  # (S, N, C)
    pbar = p.mean(0)
    ent = scipy_entropy(pbar, axis=1)
    mi = ent - scipy_entropy(p, axis=2).mean(0)
    np.testing.assert_allclose(scores.max_prob.numpy(), pbar.max(1), rtol=1e-8)
    np.testing.assert_allclose(scores.entropy.numpy(), ent, rtol=1e-8)
    np.testing.assert_allclose(scores.mutual_information.numpy(), mi, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(scores.variance.numpy(), p.var(0).sum(1), rtol=1e-6)
    torch.testing.assert_close(scores.logit_variance, cov.diagonal(dim1=1, dim2=2).sum(1))
    # Fisher norm: the score of the predicted label by autograd, in the metric Σ
    expected = []
    for xi, fi in zip(x, mean, strict=True):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.log_softmax(f(th, xi), -1)[fi.argmax()], th)
        expected.append(g @ sigma @ g)
    torch.testing.assert_close(scores.fisher_norm, torch.stack(expected))
    assert (scores.mutual_information >= 0).all()


def test_kfac_scores_use_the_structure():
    """K-FAC's scores equal the dense formula with its own ``to_dense()`` (no P×P inside)."""
    model, la, F = _setup(structure="kfac")
    x = torch.randn(5, 3, dtype=torch.float64)
    scores = ff.uncertainty.ood_scores(la, x, n_samples=4)
    mean, cov, *_ = _dense(model, F, x)
    r = torch.nn.functional.one_hot(mean.argmax(1), 3).double() - torch.softmax(mean, 1)
    torch.testing.assert_close(scores.fisher_norm, torch.einsum("nc,ncd,nd->n", r, cov, r))
    torch.testing.assert_close(scores.logit_variance, cov.diagonal(dim1=1, dim2=2).sum(1))


def test_bernoulli_fisher_norm():
    model, la, F = _setup(out_dim=1, likelihood="bernoulli")
    x = torch.randn(6, 3, dtype=torch.float64)
    scores = ff.uncertainty.ood_scores(la, x, n_samples=8)
    mean, _cov, sigma, theta, f = _dense(model, F, x)
    expected = []
    for xi, fi in zip(x, mean, strict=True):
        th = theta.clone().requires_grad_(True)
        out = f(th, xi)[0]
        logp = nn.functional.logsigmoid(out if fi > 0 else -out)  # the predicted label
        (g,) = torch.autograd.grad(logp, th)
        expected.append(g @ sigma @ g)
    torch.testing.assert_close(scores.fisher_norm, torch.stack(expected))
    assert (scores.max_prob >= 0.5 - 1e-12).all()
    assert (scores.entropy <= math.log(2) + 1e-12).all()


def test_auroc_and_fpr95_agree_with_sklearn():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, generator=gen, dtype=torch.float64)
    b = torch.randn(200, generator=gen, dtype=torch.float64) + 1.0
    labels = np.r_[np.zeros(300), np.ones(200)]
    expected = roc_auc_score(labels, np.r_[a.numpy(), b.numpy()])
    assert ff.uncertainty.ood_auroc(a, b) == pytest.approx(expected, abs=1e-12)
    # a score where lower means OOD: the same AUROC with the sign flipped
    assert ff.uncertainty.ood_auroc(-a, -b, higher_is_ood=False) == pytest.approx(expected)
    # FPR@95 by brute force: in-distribution positive (kept when the score is low)
    keep_in = np.sort(-a.numpy())[::-1]
    threshold = keep_in[math.ceil(0.95 * 300) - 1]
    brute = float(np.mean(-b.numpy() >= threshold))
    assert fpr_at_tpr(a, b) == pytest.approx(brute)
    assert 0 < brute < 1


def test_ood_metrics_directions():
    _model, la, _ = _setup()
    near = torch.randn(40, 3, dtype=torch.float64)
    s_in = ff.uncertainty.ood_scores(la, near, n_samples=16)
    metrics = ood_metrics(s_in, s_in)
    assert set(metrics) == set(HIGHER_IS_OOD)
    for name, m in metrics.items():
        assert m["auroc"] == pytest.approx(0.5), name


def test_bad_input():
    _model, la, _ = _setup()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        ff.uncertainty.ood_scores(la, x, n_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        ff.uncertainty.ood_scores(la, x, batch_size=-1)
    gauss = ff.Laplace(nn.Linear(3, 1).double(), likelihood="gaussian")
    with pytest.raises(ValueError, match="classification likelihood"):
        ff.uncertainty.ood_scores(gauss, x)
    with pytest.raises(ValueError, match="finite"):
        ff.uncertainty.ood_auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0.2]))
    with pytest.raises(ValueError, match="at least one"):
        ff.uncertainty.ood_auroc(torch.tensor([]), torch.tensor([0.2]))
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr(torch.tensor([0.1]), torch.tensor([0.2]), tpr=1.5)
    unfitted = ff.Laplace(nn.Linear(3, 2).double(), likelihood="categorical")
    with pytest.raises(ValueError, match="fit"):
        ff.uncertainty.ood_scores(unfitted, x)
