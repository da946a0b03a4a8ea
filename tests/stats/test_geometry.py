import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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
    fisher_information,
    fisher_rao_distance,
    fisher_rao_geodesic,
    jeffreys_prior,
)

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# --- Fisher–Rao: closed forms vs numerical geodesic -------------------------

ONE_PARAM = [
    (Bernoulli(t(0.1)), Bernoulli(t(0.8))),
    (Binomial(7, t(0.2)), Binomial(7, t(0.9))),
    (Geometric(t(0.1)), Geometric(t(0.8))),
    (Poisson(t(1.0)), Poisson(t(9.0))),
    (Exponential(t(0.5)), Exponential(t(5.0))),
]


@pytest.mark.parametrize("pair", ONE_PARAM, ids=lambda p: type(p[0]).__name__)
def test_one_parameter_closed_forms_match_numerical_geodesic(pair):
    p, q = pair
    closed = fisher_rao_distance(p, q, method="closed_form")
    geo = fisher_rao_geodesic(p, q)
    torch.testing.assert_close(geo.distance, closed, rtol=1e-7, atol=0)


TWO_PARAM = [
    (Normal(t(0.0), t(1.0)), Normal(t(2.0), t(0.5)), None),
    (Laplace(t(-1.0), t(0.3)), Laplace(t(1.0), t(2.0)), None),
    (StudentT(t(3.0), t(0.0), t(1.0)), StudentT(t(3.0), t(2.0), t(0.5)), ("loc", "scale")),
]


@pytest.mark.parametrize("case", TWO_PARAM, ids=lambda c: type(c[0]).__name__)
def test_two_parameter_closed_forms_match_numerical_geodesic(case):
    p, q, wrt = case
    closed = fisher_rao_distance(p, q, method="closed_form")
    geo = fisher_rao_geodesic(p, q, wrt)
    assert geo.converged
    torch.testing.assert_close(geo.distance, closed, rtol=1e-6, atol=0)
    # the path starts and ends at p and q and is a valid (σ > 0) curve
    assert geo.path.shape == (65, 2)
    torch.testing.assert_close(geo.path[0], t([float(p.loc), float(p.scale)]))
    torch.testing.assert_close(geo.path[-1], t([float(q.loc), float(q.scale)]))
    assert bool(torch.all(geo.path[:, 1] > 0))


def test_normal_geodesic_is_a_half_circle_in_scaled_half_plane():
    # geodesics of dμ²/2 + dσ² over σ² are semicircles centred on σ = 0 in (μ/√2, σ)
    g = fisher_rao_geodesic(Normal(t(-1.0), t(1.0)), Normal(t(1.0), t(1.0)))
    x, s = g.path[:, 0] / math.sqrt(2), g.path[:, 1]
    r = torch.sqrt(x**2 + s**2)
    torch.testing.assert_close(r, torch.full_like(r, float(r[0])), rtol=2e-3, atol=0)
    assert float(s.max()) > 1.2  # it bends upward, unlike the straight line


def test_numerical_geodesic_for_family_without_closed_distance():
    # Gamma has no closed-form distance: check the geodesic is no longer than the
    # straight line in (log α, log β) and at least the Fisher length lower bound
    p, q = Gamma(t(2.0), t(1.0)), Gamma(t(5.0), t(3.0))
    geo = fisher_rao_geodesic(p, q, num_points=32)
    assert geo.converged
    # line length in (α, β) by fine midpoint rule is an upper bound
    s = torch.linspace(0, 1, 2001, dtype=D)
    a = 2.0 + 3.0 * s
    b = 1.0 + 2.0 * s
    am, bm = 0.5 * (a[1:] + a[:-1]), 0.5 * (b[1:] + b[:-1])
    f = fisher_information(Gamma, concentration=am, rate=bm)
    step = torch.stack([a.diff(), b.diff()], -1)
    line = (step[:, None, :] @ f @ step[:, :, None]).sqrt().sum()
    assert float(geo.distance) <= float(line) + 1e-9
    # two symmetric evaluations agree
    back = fisher_rao_geodesic(q, p, num_points=32)
    torch.testing.assert_close(back.distance, geo.distance, rtol=1e-7, atol=0)


def test_mvn_shared_covariance_is_mahalanobis_and_different_covariances_raise():
    cov = t([[2.0, 0.3], [0.3, 1.0]])
    p = MultivariateNormal(t([0.0, 0.0]), cov)
    q = MultivariateNormal(t([1.0, -1.0]), cov)
    diff = t([1.0, -1.0])
    expected = torch.sqrt(diff @ torch.linalg.solve(cov, diff))
    torch.testing.assert_close(fisher_rao_distance(p, q), expected)
    with pytest.raises(ValueError, match="shared|equal covariance"):
        fisher_rao_distance(p, MultivariateNormal(t([0.0, 0.0]), 2 * cov))


def test_categorical_matches_bernoulli_embedding():
    p, q = t(0.3), t(0.75)
    cat = fisher_rao_distance(
        Categorical(torch.stack([p, 1 - p])), Categorical(torch.stack([q, 1 - q]))
    )
    torch.testing.assert_close(cat, fisher_rao_distance(Bernoulli(p), Bernoulli(q)))


def test_auto_distance_falls_back_to_geodesic():
    p, q = Beta(t(2.0), t(3.0)), Beta(t(2.0), t(3.0))
    assert float(fisher_rao_distance(p, q)) == pytest.approx(0.0, abs=1e-12)


def test_fisher_rao_errors():
    with pytest.raises(TypeError, match="one family"):
        fisher_rao_distance(Normal(0.0, 1.0), Laplace(0.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        fisher_rao_distance(Normal(0.0, 1.0), Normal(1.0, 1.0), method="fast")
    with pytest.raises(ValueError, match="1 or 2"):
        fisher_rao_geodesic(StudentT(t(3.0)), StudentT(t(4.0), t(1.0), t(2.0)))
    with pytest.raises(ValueError, match="total_count"):
        fisher_rao_distance(Binomial(3, t(0.2)), Binomial(4, t(0.2)))


probs = st.floats(0.01, 0.99)
locs = st.floats(-5, 5)
scales = st.floats(0.05, 5)


def _normal(m, s):
    return Normal(t(m), t(s))


@settings(max_examples=60, deadline=None)
@given(locs, scales, locs, scales, locs, scales)
def test_normal_distance_symmetric_and_triangle(m1, s1, m2, s2, m3, s3):
    a, b, c = _normal(m1, s1), _normal(m2, s2), _normal(m3, s3)
    ab, ba = fisher_rao_distance(a, b), fisher_rao_distance(b, a)
    torch.testing.assert_close(ab, ba)
    ac, bc = fisher_rao_distance(a, c), fisher_rao_distance(b, c)
    assert float(ac) <= float(ab + bc) + 1e-9
    assert float(fisher_rao_distance(a, a)) == pytest.approx(0.0, abs=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4),
    st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4),
    st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4),
)
def test_categorical_distance_symmetric_and_triangle(w1, w2, w3):
    a, b, c = (Categorical(probs=t(w) / sum(w)) for w in (w1, w2, w3))
    ab = fisher_rao_distance(a, b)
    torch.testing.assert_close(ab, fisher_rao_distance(b, a))
    assert float(fisher_rao_distance(a, c)) <= float(ab + fisher_rao_distance(b, c)) + 1e-9
    assert float(ab) <= math.pi + 1e-12  # diameter of the positive orthant of the 2-sphere


@settings(max_examples=40, deadline=None)
@given(st.floats(0.1, 50), st.floats(0.1, 50), st.floats(0.1, 50))
def test_poisson_and_exponential_triangle(x, y, z):
    for cls in (Poisson, Exponential):
        a, b, c = cls(t(x)), cls(t(y)), cls(t(z))
        ab = fisher_rao_distance(a, b)
        torch.testing.assert_close(ab, fisher_rao_distance(b, a))
        assert float(fisher_rao_distance(a, c)) <= float(ab + fisher_rao_distance(b, c)) + 1e-9


@settings(max_examples=25, deadline=None)
@given(st.floats(0.02, 0.98), st.floats(0.02, 0.98))
def test_bernoulli_closed_form_equals_integral_of_sqrt_fisher(p, q):
    # the 1-D geodesic length is ∫ √F dp; compare with a fine Simpson rule
    lo, hi = sorted((p, q))
    grid = torch.linspace(lo, hi, 2001, dtype=D)
    f = 1 / torch.sqrt(grid * (1 - grid))
    h = (hi - lo) / 2000
    simpson = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    d = fisher_rao_distance(Bernoulli(t(p)), Bernoulli(t(q)))
    assert float(d) == pytest.approx(float(simpson), rel=1e-8, abs=1e-12)


# --- Jeffreys ---------------------------------------------------------------


def test_jeffreys_bernoulli_is_beta_half_half():
    prior = jeffreys_prior(Bernoulli)
    assert prior.wrt == ("probs",)
    assert prior.proper
    assert prior.log_normalizer == pytest.approx(math.log(math.pi), rel=1e-8)
    p = torch.linspace(0.01, 0.99, 50, dtype=D)
    torch.testing.assert_close(
        prior.log_prob(p, normalized=True), Beta(t(0.5), t(0.5)).log_prob(p), rtol=1e-7, atol=1e-8
    )


def test_jeffreys_binomial_proper_with_sqrt_n_normaliser():
    prior = jeffreys_prior(Binomial, total_count=t(9.0))
    assert prior.proper
    assert math.exp(prior.log_normalizer) == pytest.approx(3 * math.pi, rel=1e-8)


@pytest.mark.parametrize(
    ("cls", "fixed", "wrt"),
    [
        (Poisson, {}, ("rate",)),
        (Exponential, {}, ("rate",)),
        (Geometric, {}, ("probs",)),
        (Normal, {"scale": 1.0}, ("loc",)),
        (Normal, {"loc": 0.0}, ("scale",)),
        (Normal, {}, ("loc", "scale")),
        (Gamma, {}, ("concentration", "rate")),
    ],
)
def test_improper_jeffreys_priors(cls, fixed, wrt):
    prior = jeffreys_prior(cls, **fixed)
    assert prior.wrt == wrt
    assert not prior.proper
    assert prior.log_normalizer is None
    with pytest.raises(ValueError, match="improper"):
        prior.log_prob(*([t(1.0)] * len(wrt)), normalized=True)


def test_jeffreys_log_density_values():
    # Poisson: π(λ) ∝ λ^{-1/2}; Normal(μ, σ): √det diag(1/σ², 2/σ²) = √2/σ²
    prior = jeffreys_prior(Poisson)
    lam = t([0.5, 4.0])
    torch.testing.assert_close(prior.log_prob(lam), -0.5 * torch.log(lam))
    normal = jeffreys_prior(Normal)
    s = t([0.5, 3.0])
    torch.testing.assert_close(normal.log_prob(t(0.0), s), 0.5 * math.log(2) - 2 * torch.log(s))


def test_jeffreys_errors():
    with pytest.raises(ValueError, match="1 or 2"):
        jeffreys_prior(StudentT)
    with pytest.raises(ValueError, match="scalar"):
        jeffreys_prior(Categorical)
    with pytest.raises(ValueError, match="one value per parameter"):
        jeffreys_prior(Bernoulli).log_prob(t(0.1), t(0.2))
