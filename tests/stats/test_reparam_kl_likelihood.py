import math

import pytest
import torch
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Exponential,
    Gamma,
    Geometric,
    Laplace,
    MultivariateNormal,
    Normal,
    Poisson,
    StudentT,
)

from fisherflow.stats import (
    change_parameterization,
    empirical_fisher,
    fisher_information,
    kl_quadratic,
    kl_quadratic_check,
    model_fisher_information,
    observed_information,
    parameter_jacobian,
    reparameterize,
)
from fisherflow.stats._params import prepare_family

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def test_logit_reparameterisation_turns_6_25_into_0_16():
    f = fisher_information(Bernoulli, probs=t(0.2))
    assert float(f) == pytest.approx(6.25, rel=1e-12)
    g = change_parameterization(f, Bernoulli, "logits", probs=t(0.2))
    assert float(g) == pytest.approx(0.16, rel=1e-12)
    # and it equals the closed form in logits directly
    direct = fisher_information(Bernoulli, logits=torch.logit(t(0.2)))
    torch.testing.assert_close(g, direct)
    # back again
    back = change_parameterization(g, Bernoulli, "probs", logits=torch.logit(t(0.2)))
    torch.testing.assert_close(back, f)


@pytest.mark.parametrize(
    ("cls", "src", "dst", "params"),
    [
        (Categorical, "probs", "logits", {"probs": t([0.2, 0.5, 0.3])}),
        (Binomial, "probs", "logits", {"total_count": 6, "probs": t(0.35)}),
        (Geometric, "probs", "logits", {"probs": t(0.35)}),
        (
            MultivariateNormal,
            ("loc", "covariance_matrix"),
            ("loc", "scale_tril"),
            {"loc": t([0.0, 1.0]), "covariance_matrix": t([[2.0, 0.5], [0.5, 1.0]])},
        ),
        (
            MultivariateNormal,
            ("loc", "covariance_matrix"),
            ("loc", "precision_matrix"),
            {"loc": t([0.0, 1.0]), "covariance_matrix": t([[2.0, 0.5], [0.5, 1.0]])},
        ),
    ],
)
def test_named_reparameterisation_matches_fisher_in_new_coordinates(cls, src, dst, params):
    f = fisher_information(cls, src, **params)
    g = change_parameterization(f, cls, dst, src, **params)
    d = cls(**params)
    dst_t = (dst,) if isinstance(dst, str) else dst
    new = {k: v for k, v in params.items() if k not in ((src,) if isinstance(src, str) else src)}
    new.update({n: getattr(d, n) for n in dst_t})
    if cls is MultivariateNormal:
        direct = _mvn_sigma_point_fisher(dst_t, new)
    else:
        direct = fisher_information(cls, dst_t, method="generic", **new)
    torch.testing.assert_close(g, direct, rtol=1e-9, atol=1e-10)


def _mvn_sigma_point_fisher(wrt, params):
    # exact E[−∇²_θ log p] for a Gaussian: the Hessian is quadratic in x, so
    # the sigma points μ ± √d L eᵢ integrate it exactly
    fam = prepare_family(MultivariateNormal, wrt, params)
    d0 = fam.dist
    d = d0.loc.shape[-1]
    chol = d0.scale_tril
    pts = [d0.loc + s * math.sqrt(d) * chol[:, i] for i in range(d) for s in (1, -1)]
    hs = [
        torch.autograd.functional.hessian(lambda th, x=x: fam.build(th).log_prob(x), fam.theta)
        for x in pts
    ]
    return -torch.stack(hs).mean(0)


def test_batched_jacobian():
    p = t([0.1, 0.5, 0.8])
    j = parameter_jacobian(Bernoulli, "logits", probs=p)
    assert j.shape == (3, 1, 1)
    torch.testing.assert_close(j[:, 0, 0], p * (1 - p))


def test_reparameterize_validates_shapes():
    with pytest.raises(ValueError, match="jacobian"):
        reparameterize(torch.eye(2), torch.eye(3))
    with pytest.raises(ValueError, match="information"):
        reparameterize(torch.ones(3), torch.eye(3))
    with pytest.raises(TypeError, match="tensors"):
        reparameterize([[1.0]], torch.eye(1))


def test_quadratic_form_is_invariant_under_reparameterisation():
    p = t(0.3)
    f = fisher_information(Bernoulli, probs=p)
    j = parameter_jacobian(Bernoulli, "logits", probs=p)
    dphi = t([[0.01]])
    dtheta = j @ dphi
    g = reparameterize(f, j)
    torch.testing.assert_close(dphi.T @ g @ dphi, dtheta.T @ f @ dtheta)


# --- KL(p_θ ‖ p_θ+δ) / (½ δᵀFδ) → 1 ---------------------------------------

KL_CASES = [
    (Bernoulli(probs=t(0.3)), {"probs": t(0.2)}),
    (Bernoulli(logits=t(0.4)), {"logits": t(1.0)}),
    (Binomial(total_count=8, probs=t(0.6)), {"probs": t(-0.2)}),
    (Categorical(logits=t([0.1, -0.3, 0.7])), {"logits": t([0.5, -1.0, 0.2])}),
    (Categorical(probs=t([0.2, 0.5, 0.3])), {"probs": t([0.1, -0.15, 0.05])}),
    (Geometric(probs=t(0.3)), {"probs": t(0.2)}),
    (Poisson(t(3.0)), {"rate": t(1.0)}),
    (Exponential(t(2.0)), {"rate": t(1.0)}),
    (Gamma(t(2.0), t(3.0)), {"concentration": t(1.0), "rate": t(-1.0)}),
    (Beta(t(2.0), t(3.0)), {"concentration1": t(1.0), "concentration0": t(-1.0)}),
    (Normal(t(0.5), t(2.0)), {"loc": t(1.0), "scale": t(0.5)}),
    (Laplace(t(0.5), t(2.0)), {"loc": t(1.0), "scale": t(0.5)}),
    (
        MultivariateNormal(t([0.0, 1.0]), covariance_matrix=t([[2.0, 0.5], [0.5, 1.0]])),
        {"loc": t([0.3, -0.2]), "covariance_matrix": t([[0.3, 0.1], [0.1, -0.2]])},
    ),
]


@pytest.mark.parametrize("case", range(len(KL_CASES)), ids=lambda i: type(KL_CASES[i][0]).__name__)
def test_kl_over_quadratic_tends_to_one(case):
    dist, direction = KL_CASES[case]
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        delta = {k: eps * v for k, v in direction.items()}
        kl, quad = kl_quadratic_check(dist, delta)
        assert float(quad) > 0
        errs.append(abs(float(kl / quad) - 1))
    assert errs[-1] < 5e-3
    # the ratio error shrinks linearly in ε (cubic remainder)
    assert errs[2] < errs[1] < errs[0] or errs[2] < 1e-6


def test_kl_quadratic_tensor_delta_needs_wrt():
    p = Normal(t(0.0), t(1.0))
    with pytest.raises(ValueError, match="wrt"):
        kl_quadratic(p, t([0.1, 0.0]))
    q = kl_quadratic(p, t([0.1, 0.2]), wrt=("loc", "scale"))
    assert float(q) == pytest.approx(0.5 * (0.01 + 2 * 0.04))
    with pytest.raises(ValueError, match="last dimension"):
        kl_quadratic(p, t([0.1]), wrt=("loc", "scale"))
    with pytest.raises(ValueError, match="valid"):
        kl_quadratic_check(p, {"scale": t(-2.0)})


def test_student_t_kl_quadratic_by_quadrature():
    # torch has no Student-t KL: check ½δᵀFδ against a numerical KL
    p = StudentT(t(4.0), t(0.0), t(1.5))
    delta = {"loc": t(1e-2), "scale": t(-1e-2)}
    x = torch.linspace(-400, 400, 400_001, dtype=D)
    q = StudentT(t(4.0), t(1e-2), t(1.49))
    lp, lq = p.log_prob(x), q.log_prob(x)
    kl = torch.trapezoid(lp.exp() * (lp - lq), x)
    assert float(kl / kl_quadratic(p, delta)) == pytest.approx(1.0, abs=2e-2)


# --- observed / empirical --------------------------------------------------


def _normal_ll(theta, x):
    return Normal(theta[0], theta[1]).log_prob(x)


def test_observed_empirical_and_expected_agree_on_large_sample_at_truth():
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 2.0 * torch.randn(200_000, generator=g, dtype=D)
    theta = t([0.5, 2.0])
    n = x.numel()
    expected = n * fisher_information(Normal, loc=theta[0], scale=theta[1])
    obs = observed_information(_normal_ll, theta, x)
    emp = empirical_fisher(_normal_ll, theta, x)
    torch.testing.assert_close(obs / n, expected / n, rtol=0, atol=2e-2)
    torch.testing.assert_close(emp / n, expected / n, rtol=0, atol=2e-2)


def test_observed_and_empirical_differ_under_misspecification():
    # Laplace data fitted with a Normal: at the MLE observed ≠ empirical (scale block)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(50_000, generator=g, dtype=D) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    mle = t([float(x.mean()), float(x.std(unbiased=False))])
    obs = observed_information(_normal_ll, mle, x) / x.numel()
    emp = empirical_fisher(_normal_ll, mle, x) / x.numel()
    # observed scale entry is 2/σ²; empirical is (kurtosis − 1)/σ² = 5/σ² for Laplace
    s2 = float(mle[1] ** 2)
    assert float(obs[1, 1]) * s2 == pytest.approx(2.0, rel=1e-6)
    assert float(emp[1, 1]) * s2 == pytest.approx(5.0, rel=0.1)


def test_empirical_uses_per_example_scores_not_mean_gradient():
    x = t([1.0, 0.0, 1.0, 1.0])

    def ll(th, x):
        return Bernoulli(probs=th[0]).log_prob(x)

    p = t([0.75])
    emp = empirical_fisher(ll, p, x)
    # at the MLE the mean gradient is zero, so its square would be 0
    assert float(emp) == pytest.approx(3 / 0.75**2 + 1 / 0.25**2)


def test_likelihood_input_validation():
    with pytest.raises(TypeError, match="callable"):
        observed_information(None, t([1.0]), None)
    with pytest.raises(ValueError, match="1-D"):
        observed_information(_normal_ll, t([[1.0]]), None)
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        empirical_fisher(lambda th, x: _normal_ll(th, x).sum(), t([0.0, 1.0]), t([1.0, 2.0]))


def test_model_fisher_of_cubed_mean():
    def params(th):
        return {"loc": th[0] ** 3, "scale": torch.ones((), dtype=th.dtype)}

    for th1 in (0.0, 0.7, -1.3):
        f = model_fisher_information(Normal, params, t([th1, 2.0]))
        torch.testing.assert_close(f, t([[9 * th1**4, 0.0], [0.0, 0.0]]))
    assert math.isfinite(float(f.sum()))
