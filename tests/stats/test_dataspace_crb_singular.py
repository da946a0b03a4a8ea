import math

import pytest
import torch
from torch.distributions import (
    Bernoulli,
    Categorical,
    MixtureSameFamily,
    Normal,
    Poisson,
)

from fisherflow.stats import (
    cramer_rao_bound,
    data_score,
    differential_entropy,
    estimator_efficiency,
    fisher_divergence,
    fisher_information,
    fisher_rank,
    location_fisher_information,
    model_fisher_information,
    null_directions,
    score_matching_loss,
)

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def mixture(w, m, s):
    return MixtureSameFamily(Categorical(probs=t(w)), Normal(t(m), t(s)))


# --- Cramér–Rao -------------------------------------------------------------


def test_cramer_rao_bound_values_and_errors():
    torch.testing.assert_close(cramer_rao_bound(Bernoulli, 100, probs=t(0.3)), t([[0.0021]]))
    crb = cramer_rao_bound(Normal, 50, loc=t(0.0), scale=t(2.0))
    torch.testing.assert_close(crb, torch.diag(t([4 / 50, 4 / 100])))
    with pytest.raises(ValueError, match="n must be an integer"):
        cramer_rao_bound(Poisson, 0, rate=t(1.0))
    with pytest.raises(ValueError, match="singular"):
        cramer_rao_bound(Categorical, 10, probs=t([0.2, 0.3, 0.5]))


def _normal_mle(x):
    return torch.stack([x.mean(1), x.std(1, unbiased=False)], -1)


@pytest.mark.parametrize(
    ("cls", "params", "estimator"),
    [
        (Bernoulli, {"probs": t(0.3)}, lambda x: x.mean(1)),
        (Poisson, {"rate": t(4.0)}, lambda x: x.mean(1)),
        (Normal, {"loc": t(1.0), "scale": t(2.0)}, _normal_mle),
    ],
    ids=["bernoulli", "poisson", "normal"],
)
def test_mle_variance_approaches_cramer_rao_bound(cls, params, estimator):
    res = estimator_efficiency(cls, estimator, 200, num_trials=4000, seed=0, **params)
    # 4000 trials: the variance estimate has ≈2.2% relative standard error
    assert torch.all((res.efficiency > 0.9) & (res.efficiency < 1.1)), res.efficiency
    torch.testing.assert_close(res.mean, res.truth, rtol=0, atol=0.05)


def test_inefficient_estimator_is_detected():
    # the sample median of a Normal has asymptotic efficiency 2/π ≈ 0.637
    res = estimator_efficiency(
        Normal, lambda x: x.median(1).values, 201, "loc", num_trials=4000, loc=t(0.0), scale=t(1.0)
    )
    assert float(res.efficiency[0]) == pytest.approx(2 / math.pi, abs=0.05)


def test_estimator_efficiency_validates_output_shape():
    with pytest.raises(ValueError, match="estimator must return shape"):
        estimator_efficiency(Poisson, lambda x: x, 10, num_trials=5, rate=t(1.0))


# --- data space ---------------------------------------------------------------


def test_location_fisher_and_entropy_of_normal():
    s = t([0.5, 2.0])
    n = Normal(t([0.0, 1.0]), s)
    torch.testing.assert_close(location_fisher_information(n), 1 / s**2, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        differential_entropy(n), 0.5 * torch.log(2 * math.pi * math.e * s**2), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("time", [0.05, 0.5, 2.0])
def test_de_bruijn_identity_for_a_gaussian_mixture(time):
    w, m, s = [0.3, 0.5, 0.2], [-2.0, 0.5, 3.0], [0.4, 0.7, 0.3]

    def smoothed(tt):
        return mixture(w, m, [math.sqrt(si**2 + tt) for si in s])

    eps = 1e-4
    dh = (
        differential_entropy(smoothed(time + eps)) - differential_entropy(smoothed(time - eps))
    ) / (2 * eps)
    half_j = 0.5 * location_fisher_information(smoothed(time))
    rel = abs(float(dh / half_j) - 1)
    assert rel < 1e-2
    assert rel < 1e-5  # in fact far tighter than the 1% asked for


def _random_mixture(g):
    k = int(torch.randint(1, 4, (1,), generator=g))
    w = torch.rand(k, generator=g, dtype=D) + 0.1
    m = 4 * torch.randn(k, generator=g, dtype=D)
    s = 0.2 + 2 * torch.rand(k, generator=g, dtype=D)
    return (w / w.sum()).tolist(), m.tolist(), s.tolist()


def _sum_of_mixtures(a, b):
    w = [wa * wb for wa in a[0] for wb in b[0]]
    m = [ma + mb for ma in a[1] for mb in b[1]]
    s = [math.sqrt(sa**2 + sb**2) for sa in a[2] for sb in b[2]]
    return mixture(w, m, s)


def test_stam_inequality_on_random_pairs():
    g = torch.Generator().manual_seed(7)
    for _ in range(25):
        a, b = _random_mixture(g), _random_mixture(g)
        jx = location_fisher_information(mixture(*a))
        jy = location_fisher_information(mixture(*b))
        jxy = location_fisher_information(_sum_of_mixtures(a, b))
        assert float(1 / jxy) >= float(1 / jx + 1 / jy) * (1 - 1e-9)


def test_stam_equality_for_gaussians():
    a, b = ([1.0], [0.0], [0.7]), ([1.0], [1.0], [1.9])
    jx = location_fisher_information(mixture(*a))
    jy = location_fisher_information(mixture(*b))
    jxy = location_fisher_information(_sum_of_mixtures(a, b))
    torch.testing.assert_close(1 / jxy, 1 / jx + 1 / jy, rtol=1e-10, atol=0)


def test_data_score_and_fisher_divergence_against_closed_form():
    p, q = Normal(t(0.5), t(1.5)), Normal(t(-0.5), t(0.8))
    x = torch.linspace(-2, 2, 5, dtype=D)
    torch.testing.assert_close(data_score(p, x), -(x - 0.5) / 1.5**2)
    g = torch.Generator().manual_seed(0)
    xs = 0.5 + 1.5 * torch.randn(400_000, generator=g, dtype=D)
    a = 1 / 0.8**2 - 1 / 1.5**2
    exact = a**2 * 1.5**2 + 1.0**2 / 0.8**4
    assert float(fisher_divergence(p, q, xs)) == pytest.approx(exact, rel=1e-2)
    # unnormalised log-densities give the same value
    fd = fisher_divergence(lambda x: -0.5 * ((x - 0.5) / 1.5) ** 2 + 7.0, q.log_prob, xs)
    torch.testing.assert_close(fd, fisher_divergence(p, q, xs))


def test_score_matching_recovers_gaussian_parameters_without_normaliser():
    g = torch.Generator().manual_seed(3)
    x = 1.0 + 2.0 * torch.randn(5000, generator=g, dtype=D)
    mu = torch.zeros((), dtype=D, requires_grad=True)
    log_s = torch.zeros((), dtype=D, requires_grad=True)
    opt = torch.optim.LBFGS(
        [mu, log_s],
        max_iter=500,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = score_matching_loss(lambda y: -0.5 * ((y - mu) / log_s.exp()) ** 2, x)
        loss.backward()
        return loss

    opt.step(closure)
    # for a Gaussian model, score matching coincides with the MLE
    assert float(mu.detach()) == pytest.approx(float(x.mean()), abs=1e-6)
    assert float(log_s.detach().exp()) == pytest.approx(float(x.std(unbiased=False)), rel=1e-6)


def test_score_matching_equals_half_fisher_divergence_up_to_constant():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400_000, 2, generator=g, dtype=D)
    p = Normal(t(0.0), t(1.0))

    def model(loc, scale):
        return lambda y: Normal(loc, scale).log_prob(y).sum(-1)

    def fd(loc, scale):
        return 2 * fisher_divergence(lambda y: p.log_prob(y).sum(-1), model(loc, scale), x) / 2

    l1 = score_matching_loss(model(t(0.3), t(1.2)), x).detach()
    l0 = score_matching_loss(model(t(0.0), t(1.0)), x).detach()
    # J(q) − J(p) = ½ D_F(p‖q) − ½ D_F(p‖p) = ½ D_F(p‖q)
    assert float(l1 - l0) == pytest.approx(0.5 * float(fd(t(0.3), t(1.2))), rel=2e-2)
    with pytest.raises(ValueError, match="shape"):
        score_matching_loss(model(t(0.0), t(1.0)), torch.zeros(2, 2, 2))


# --- singular models -----------------------------------------------------------


def _cubed(th):
    return {"loc": th[0] ** 3, "scale": torch.ones((), dtype=th.dtype)}


def test_cubed_mean_model_rank_and_null_directions():
    f0 = model_fisher_information(Normal, _cubed, t([0.0, 0.4]))
    torch.testing.assert_close(f0, torch.zeros(2, 2, dtype=D))
    assert int(fisher_rank(f0)) == 0
    assert null_directions(f0).shape == (2, 2)
    f1 = model_fisher_information(Normal, _cubed, t([1.1, 0.4]))
    torch.testing.assert_close(f1, t([[9 * 1.1**4, 0.0], [0.0, 0.0]]))
    assert int(fisher_rank(f1)) == 1
    v = null_directions(f1)
    assert v.shape == (2, 1)
    torch.testing.assert_close(v.abs(), t([[0.0], [1.0]]))


def test_categorical_probs_fisher_null_direction_is_p():
    p = t([0.2, 0.3, 0.5])
    f = fisher_information(Categorical, probs=p)
    assert int(fisher_rank(f)) == 2
    v = null_directions(f)[:, 0]
    torch.testing.assert_close(v.abs(), p / p.norm())


def test_rank_is_batched_and_validates():
    f = fisher_information(Bernoulli, probs=t([0.1, 0.5]))
    assert fisher_rank(f).tolist() == [1, 1]
    with pytest.raises(ValueError, match="shape"):
        fisher_rank(torch.ones(3))
    with pytest.raises(ValueError, match="one"):
        null_directions(torch.eye(2).expand(3, 2, 2))
