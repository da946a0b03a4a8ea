"""Likelihoods: NLL against torch.distributions, output Fisher against the NLL Hessian."""

from __future__ import annotations

import pytest
import torch

from fisherflow.estimation.likelihoods import (
    LIKELIHOODS,
    Gaussian,
    get_likelihood,
    register_likelihood,
)

NAMES = ["categorical", "bernoulli", "gaussian", "poisson"]


def _data(name):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(5, 3, generator=g, dtype=torch.float64)
    lik = get_likelihood(name)
    y = lik.sample(lik.prepare(out, None).output, g)
    return lik, out, y


@pytest.mark.parametrize("name", NAMES)
def test_output_fisher_is_nll_hessian(name):
    lik, out, y = _data(name)
    for n in range(out.shape[0]):
        H = torch.autograd.functional.hessian(
            lambda f, yn=y[n : n + 1]: lik.nll(f[None], yn).sum(), out[n]
        )
        torch.testing.assert_close(lik.output_fisher(out[n : n + 1])[0], H)


@pytest.mark.parametrize("name", NAMES)
def test_nll_matches_torch_distributions(name):
    lik, out, y = _data(name)
    dists = {
        "categorical": lambda: torch.distributions.Categorical(logits=out).log_prob(y),
        "bernoulli": lambda: torch.distributions.Bernoulli(logits=out).log_prob(y).sum(-1),
        "gaussian": lambda: torch.distributions.Normal(out, 1.0).log_prob(y).sum(-1),
        "poisson": lambda: torch.distributions.Poisson(out.exp()).log_prob(y).sum(-1),
    }
    torch.testing.assert_close(lik.nll(out, y), -dists[name]())


@pytest.mark.parametrize("name", NAMES)
def test_fisher_is_expected_score_outer_product(name):
    lik, out, _ = _data(name)
    f = out[:1].repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    y = lik.sample(f, g)
    f = f.clone().requires_grad_(True)
    (s,) = torch.autograd.grad(lik.nll(f, y).sum(), f)
    emp = s.T @ s / s.shape[0]
    torch.testing.assert_close(emp, lik.output_fisher(out[:1])[0], atol=0.1, rtol=0.1)


def test_categorical_masking_and_validation():
    lik = get_likelihood("categorical")
    p = lik.prepare(torch.zeros(2, 3, 4), torch.tensor([[1, -100, 2], [0, 3, -100]]))
    assert p.count == 4
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        lik.prepare(torch.zeros(1, 4), torch.tensor([7]))
    with pytest.raises(TypeError, match="integer"):
        lik.prepare(torch.zeros(1, 4), torch.tensor([0.5]))


def test_registry():
    with pytest.raises(ValueError, match="already registered"):
        register_likelihood("gaussian", Gaussian)
    with pytest.raises(ValueError, match="variance"):
        Gaussian(variance=0.0)
    register_likelihood("_test_half", lambda: Gaussian(0.5))
    try:
        assert get_likelihood("_test_half").variance == 0.5
    finally:
        del LIKELIHOODS["_test_half"]


@pytest.mark.parametrize("classes", [3, 10, 1000])
def test_categorical_sampler_frequencies(classes):
    """Inverse-CDF draws follow softmax(logits); a -inf logit is never drawn."""
    from scipy import stats

    lik = get_likelihood("categorical")
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(1, classes, generator=g, dtype=torch.float64) * 2
    logits[0, 1] = float("-inf")
    n = 60000
    y = lik.sample(logits.repeat(n, 1), g)
    counts = torch.bincount(y, minlength=classes).double()
    assert counts[1] == 0
    p = torch.softmax(logits[0], -1)
    keep = p * n >= 5  # chi-square cells with enough expected counts
    other = counts[~keep].sum()
    obs = torch.cat([counts[keep], other[None]]).numpy()
    exp = torch.cat([p[keep] * n, (p[~keep].sum() * n)[None]]).numpy()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_custom_mask_and_nll_grad_override_are_respected():
    """A subclass masking rows after ``prepare`` and an ``nll_grad`` override with a mask."""
    from fisherflow.estimation.scores import make_scores

    class NanMasked(Gaussian):
        def prepare(self, output, target):
            p = super().prepare(output, target)
            p.mask = ~torch.isnan(p.target).any(-1)
            p.target = torch.nan_to_num(p.target)
            return p

    class Override(Gaussian):
        def nll_grad(self, output, target, mask):
            return (output - target) * mask[:, None].to(output.dtype)

    out = torch.zeros(4, 1)
    y = torch.tensor([[1.0], [float("nan")], [2.0], [3.0]])
    s = make_scores(NanMasked(), out, y, "empirical", 4)
    assert s.count == 3
    (g,) = list(s)
    assert g[1].item() == 0.0
    (g2,) = list(make_scores(Override(), out, torch.ones(4, 1), "empirical", 4))
    torch.testing.assert_close(g2, -torch.ones(4, 1))
