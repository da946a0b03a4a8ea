"""Von Mises information on the circle, the quadrature's refusal, Jeffreys name checks."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special
from torch.distributions import Beta, Normal, VonMises

from fisherflow.stats import fisher_information, fisher_information_generic, jeffreys_prior
from fisherflow.stats._quadrature import true_support

D = torch.float64


def _circle_fisher(mu: float, kappa: float) -> np.ndarray:
    """E[s sᵀ] by adaptive quadrature over one period, with scipy's Bessel functions."""
    log_norm = math.log(2 * math.pi) + math.log(special.i0e(kappa)) + kappa
    a = special.i1e(kappa) / special.i0e(kappa)

    def entry(i: int, j: int) -> float:
        def f(x: float) -> float:
            s = (kappa * math.sin(x - mu), math.cos(x - mu) - a)  # ∂μ, ∂κ of log p
            return s[i] * s[j] * math.exp(kappa * math.cos(x - mu) - log_norm)

        return integrate.quad(f, mu - math.pi, mu + math.pi, epsabs=1e-14, epsrel=1e-13)[0]

    return np.array([[entry(0, 0), entry(0, 1)], [entry(1, 0), entry(1, 1)]])


@pytest.mark.parametrize(("mu", "kappa"), [(0.3, 2.0), (-2.9, 0.05), (3.0, 200.0), (10.0, 5.0)])
def test_von_mises_closed_form_matches_an_integral_over_the_circle(mu, kappa):
    expected = torch.from_numpy(_circle_fisher(mu, kappa))
    closed = fisher_information(
        VonMises, loc=torch.tensor(mu, dtype=D), concentration=torch.tensor(kappa, dtype=D)
    )
    torch.testing.assert_close(closed, expected, rtol=1e-10, atol=1e-13)
    # The generic path integrates torch's density over one period. torch computes
    # its normaliser log I₀(κ) by a polynomial approximation good to ~1e-7, which
    # the reported error (lost or extra probability mass) accounts for.
    est = fisher_information_generic(
        VonMises, loc=torch.tensor(mu, dtype=D), concentration=torch.tensor(kappa, dtype=D)
    )
    assert est.integration == "quadrature"
    scale = expected.diagonal().max()
    assert float((est.information - expected).abs().max()) <= 1e-6 * scale
    assert torch.all((est.information - expected).abs() <= est.error + 1e-12 * scale)


def test_von_mises_true_support_is_one_period():
    support = true_support(VonMises(torch.tensor(2 * math.pi + 1.0, dtype=D), torch.tensor(1.0)))
    torch.testing.assert_close(support.lower_bound, torch.tensor(1.0 - math.pi, dtype=D))
    torch.testing.assert_close(support.upper_bound, torch.tensor(1.0 + math.pi, dtype=D))
    assert true_support(Normal(0.0, 1.0)) is Normal.support


@pytest.mark.parametrize(
    ("cls", "params"),
    [
        (Beta, {"concentration1": 0.1, "concentration0": 0.2}),  # end-point spikes
        (Normal, {"loc": 1e3, "scale": 1e-3}),  # cancellation in x − μ
    ],
)
def test_quadrature_refuses_an_integral_it_cannot_trust(cls, params):
    p = {k: torch.tensor(v, dtype=D) for k, v in params.items()}
    with pytest.raises(ValueError, match=f"{cls.__name__}: the quadrature .* did not converge"):
        fisher_information_generic(cls, **p)
    # a looser tolerance is the caller's explicit choice
    est = fisher_information_generic(cls, rtol=1.0, **p)
    assert est.integration == "quadrature"


@pytest.mark.parametrize("rtol", [0.0, -1.0, float("nan"), True, "1e-4"])
def test_bad_quadrature_tolerance(rtol):
    with pytest.raises(ValueError, match="rtol must be a positive finite number"):
        fisher_information_generic(Normal, loc=0.0, scale=1.0, rtol=rtol)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: jeffreys_prior(Beta, "alpha"), r"unknown parameter\(s\) \['alpha'\].*"),
        (lambda: jeffreys_prior(Normal, ("loc", 3)), r"unknown parameter\(s\) \[3\]"),
        (lambda: jeffreys_prior(Normal, "loc", sigma=1.0), r"no parameter\(s\) \['sigma'\]"),
        (lambda: jeffreys_prior(Normal, ("loc", "scale"), scale=1.0), "both free"),
    ],
)
def test_jeffreys_bad_names_raise_value_error_listing_valid_names(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    if "both" not in message:
        assert "valid names: [" in str(info.value)


@pytest.mark.parametrize("kappa", [1e-6, 0.3, 49.9, 50.0, 300.0, 1e4, 1e8])
def test_von_mises_concentration_information_keeps_its_precision_at_large_kappa(kappa):
    # A'(κ) = 1 − A/κ − A² ≈ 1/(2κ²) cancels in floating point; the closed form
    # switches to the asymptotic series. Reference: 50-digit Bessel functions.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    k = mpmath.mpf(kappa)
    a = mpmath.besseli(1, k) / mpmath.besseli(0, k)
    expected = torch.tensor([[float(k * a), 0.0], [0.0, float(1 - a / k - a * a)]], dtype=D)
    closed = fisher_information(VonMises, loc=0.0, concentration=torch.tensor(kappa, dtype=D))
    torch.testing.assert_close(closed, expected, rtol=1e-13, atol=0.0)


def test_jeffreys_prior_of_the_von_mises_concentration_is_improper():
    # √A'(κ) ~ 1/(√2 κ): the prior's mass grows like log κ, so it has no normaliser.
    prior = jeffreys_prior(VonMises, "concentration", loc=torch.tensor(0.0, dtype=D))
    assert not prior.proper and prior.log_normalizer is None
