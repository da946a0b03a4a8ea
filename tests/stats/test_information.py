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
    Pareto,
    Poisson,
    StudentT,
    Uniform,
    VonMises,
    Weibull,
)

from fisherflow.stats import (
    fisher_information,
    fisher_information_generic,
    register_fisher,
)
from fisherflow.stats._params import prepare_family
from fisherflow.stats._registry import CLOSED_FORMS

D = torch.float64
G = torch.Generator().manual_seed(1234)


def U(lo, hi, n=6):
    return lo + (hi - lo) * torch.rand(n, generator=G, dtype=D)


def spd(d, n):
    a = torch.randn(n, d, d, generator=G, dtype=D)
    return a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=D)


# (family, params at random values, rtol) -- batched: each param has batch shape (6,)
CASES = {
    "bernoulli-probs": (Bernoulli, lambda: {"probs": U(0.05, 0.95)}, 1e-12),
    "bernoulli-logits": (Bernoulli, lambda: {"logits": U(-3, 3)}, 1e-12),
    "binomial-probs": (Binomial, lambda: {"total_count": 9, "probs": U(0.05, 0.95)}, 1e-12),
    "binomial-logits": (Binomial, lambda: {"total_count": 9, "logits": U(-3, 3)}, 1e-12),
    "categorical-probs": (
        Categorical,
        lambda: {"probs": torch.softmax(torch.randn(6, 4, generator=G, dtype=D), -1)},
        1e-12,
    ),
    "categorical-logits": (
        Categorical,
        lambda: {"logits": torch.randn(6, 4, generator=G, dtype=D)},
        1e-12,
    ),
    "geometric-probs": (Geometric, lambda: {"probs": U(0.05, 0.95)}, 1e-10),
    "geometric-logits": (Geometric, lambda: {"logits": U(-3, 3)}, 1e-10),
    "poisson": (Poisson, lambda: {"rate": U(0.2, 30.0)}, 1e-10),
    "exponential": (Exponential, lambda: {"rate": U(0.1, 10.0)}, 1e-10),
    "gamma": (Gamma, lambda: {"concentration": U(0.5, 8.0), "rate": U(0.2, 5.0)}, 1e-9),
    "beta": (Beta, lambda: {"concentration1": U(0.5, 6.0), "concentration0": U(0.5, 6.0)}, 1e-8),
    "normal": (Normal, lambda: {"loc": U(-3, 3), "scale": U(0.1, 4.0)}, 1e-10),
    "laplace": (Laplace, lambda: {"loc": U(-3, 3), "scale": U(0.1, 4.0)}, 1e-10),
    "student-t-loc-scale": (
        StudentT,
        lambda: {"df": U(0.8, 20.0), "loc": U(-3, 3), "scale": U(0.1, 4.0)},
        1e-9,
    ),
    # torch's von Mises normaliser (a polynomial log I₀) is good to ~1e-7 relative
    "von-mises": (VonMises, lambda: {"loc": U(-9, 9), "concentration": U(0.05, 30.0)}, 1e-6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_closed_form_equals_generic_autograd(name):
    cls, make, rtol = CASES[name]
    params = make()
    wrt = None
    if cls is StudentT:
        wrt = ("loc", "scale")
    closed = fisher_information(cls, wrt, method="closed_form", **params)
    est = fisher_information_generic(cls, wrt, **params)
    assert closed.dtype == D
    assert closed.shape[0] == 6
    scale = closed.abs().amax((-1, -2), keepdim=True)
    torch.testing.assert_close(est.information / scale, closed / scale, rtol=0, atol=rtol)
    assert torch.all(est.error <= 1e-6 * scale)


def test_student_t_df_entries_match_autograd():
    params = {"df": U(1.5, 15.0), "loc": U(-1, 1), "scale": U(0.3, 3.0)}
    closed = fisher_information(StudentT, ("df", "loc", "scale"), method="closed_form", **params)
    est = fisher_information_generic(StudentT, ("df", "loc", "scale"), **params).information
    torch.testing.assert_close(est, closed, rtol=1e-8, atol=1e-12)


def test_every_registered_family_is_covered_by_the_cases():
    covered = {c[0] for c in CASES.values()} | {MultivariateNormal}
    assert {c for c in CLOSED_FORMS if c.__module__.startswith("torch.")} <= covered


def _mvn_params(d):
    return {"loc": torch.randn(d, generator=G, dtype=D), "covariance_matrix": spd(d, 1)[0]}


@pytest.mark.parametrize("d", [1, 2, 3])
def test_mvn_closed_form_equals_expected_negative_hessian_autograd(d):
    # −∇²_θ log p(x|θ) is a degree-2 polynomial in x, so the 2d sigma points
    # μ ± √d L eᵢ give its Gaussian expectation exactly: an exact autograd check
    # of the (μ, vech Σ) parameterisation.
    params = _mvn_params(d)
    fam = prepare_family(MultivariateNormal, None, params)
    theta = fam.theta
    chol = torch.linalg.cholesky(params["covariance_matrix"])
    pts = [params["loc"] + s * math.sqrt(d) * chol[:, i] for i in range(d) for s in (1, -1)]
    hs = [
        torch.autograd.functional.hessian(lambda t, x=x: fam.build(t).log_prob(x), theta)
        for x in pts
    ]
    expected = -torch.stack(hs).mean(0)
    closed = fisher_information(MultivariateNormal, method="closed_form", **params)
    torch.testing.assert_close(closed, expected, rtol=1e-10, atol=1e-12)
    # the mean block is Σ⁻¹
    torch.testing.assert_close(closed[:d, :d], torch.linalg.inv(params["covariance_matrix"]))


def test_mvn_generic_monte_carlo_agrees_within_standard_errors():
    params = _mvn_params(2)
    closed = fisher_information(MultivariateNormal, method="closed_form", **params)
    est = fisher_information_generic(MultivariateNormal, num_samples=200_000, seed=3, **params)
    assert est.integration == "mc"
    z = (est.information - closed).abs() / (est.error + 1e-12)
    assert float(z.max()) < 5.0


def test_textbook_values():
    torch.testing.assert_close(
        fisher_information(Bernoulli, probs=0.3), torch.tensor([[4.7619047619]]), rtol=1e-6, atol=0
    )
    lam = torch.tensor([0.5, 2.0, 9.0], dtype=D)
    torch.testing.assert_close(fisher_information(Poisson, rate=lam)[..., 0, 0], 1 / lam)
    # Normal variance v = σ²: reparameterise (loc, scale) → (loc, v) with dσ/dv = 1/(2σ)
    s = torch.tensor(1.7, dtype=D)
    f = fisher_information(Normal, loc=torch.tensor(0.0, dtype=D), scale=s)
    jac = torch.diag(torch.stack([torch.tensor(1.0, dtype=D), 1 / (2 * s)]))
    fv = jac.T @ f @ jac
    torch.testing.assert_close(fv[1, 1], 1 / (2 * s**4))


def test_wrt_order_selects_and_permutes():
    p = {"concentration": torch.tensor(2.0, dtype=D), "rate": torch.tensor(3.0, dtype=D)}
    full = fisher_information(Gamma, **p)
    swapped = fisher_information(Gamma, ("rate", "concentration"), **p)
    torch.testing.assert_close(swapped, full.flip(0).flip(1))
    only = fisher_information(Gamma, "rate", **p)
    torch.testing.assert_close(only, full[1:, 1:])


def test_batched_parameters_give_batched_matrices():
    loc = torch.zeros(3, 1, dtype=D)
    scale = torch.tensor([1.0, 2.0], dtype=D)
    f = fisher_information(Normal, loc=loc, scale=scale)
    assert f.shape == (3, 2, 2, 2)
    torch.testing.assert_close(f[2, 1], torch.diag(torch.tensor([0.25, 0.5], dtype=D)))


def test_generic_path_for_family_without_closed_form():
    # Weibull(scale λ, shape k): F_λλ = (k/λ)² (Weibull has no registered closed form)
    lam, k = torch.tensor(1.5, dtype=D), torch.tensor(2.5, dtype=D)
    f = fisher_information(Weibull, "scale", scale=lam, concentration=k)
    torch.testing.assert_close(f[0, 0], (k / lam) ** 2, rtol=1e-9, atol=0)


def test_register_fisher_decorator_and_dispatch():
    class Coin(Bernoulli):
        pass

    @register_fisher(Coin)
    def _coin(dist, given):
        p = dist.probs
        return ("probs",), (2.0 / (p * (1 - p)))[..., None, None]  # deliberately wrong

    try:
        f = fisher_information(Coin, probs=torch.tensor(0.5, dtype=D))
        assert float(f) == pytest.approx(8.0)
        g = fisher_information(Coin, method="generic", probs=torch.tensor(0.5, dtype=D))
        assert float(g) == pytest.approx(4.0)
    finally:
        del CLOSED_FORMS[Coin]


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: fisher_information(Bernoulli, probs=1.5), ValueError, "probs.*1.5"),
        (lambda: fisher_information(Bernoulli, probs=-0.1), ValueError, "probs"),
        (lambda: fisher_information(Normal, loc=0.0, scale=-1.0), ValueError, "scale.*-1"),
        (
            lambda: fisher_information(Normal, ("loc", "sigma"), loc=0.0, scale=1.0),
            ValueError,
            "unknown parameter 'sigma'.*valid names",
        ),
        (lambda: fisher_information(Normal, loc=0.0, scale=1.0, sd=2.0), TypeError, "no param"),
        (
            lambda: fisher_information(Uniform, low=0.0, high=1.0),
            ValueError,
            "support that depends",
        ),
        (lambda: fisher_information(Pareto, scale=1.0, alpha=2.0), ValueError, "support"),
        (
            lambda: fisher_information(Binomial, "total_count", total_count=5, probs=0.3),
            ValueError,
            "discrete",
        ),
        (lambda: fisher_information("Normal", loc=0.0, scale=1.0), TypeError, "dist_cls"),
        (
            lambda: fisher_information(Normal, method="magic", loc=0.0, scale=1.0),
            ValueError,
            "auto",
        ),
        (
            lambda: fisher_information(Weibull, method="closed_form", scale=1.0, concentration=2.0),
            ValueError,
            "registered families",
        ),
        (
            lambda: fisher_information_generic(Normal, integration="exact", loc=0.0, scale=1.0),
            ValueError,
            "enumerable",
        ),
        (lambda: fisher_information(Bernoulli, "logits", probs=0.3), ValueError, "not given"),
    ],
)
def test_bad_input_raises_explaining_why(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_uniform_with_only_fixed_support_parameters_is_still_rejected_for_moving_bound():
    # support depends on 'high' only when 'high' is differentiated
    with pytest.raises(ValueError, match="high"):
        fisher_information(Uniform, "high", low=0.0, high=2.0)
