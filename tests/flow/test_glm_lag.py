"""The fixed-lag window of OnlineGLM: exact where it must be, validated at the boundary."""

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from fisherflow.flow import Batches, OnlineGLM
from fisherflow.flow.glm_lag import DEFAULT_LAG, relinearised_center


def _one_pass(X, y, family, batch, **kw):
    glm = OnlineGLM(family, **kw)
    for Xb, yb, _ in Batches(X, y, batch_size=batch):
        glm.partial_fit(Xb, yb)
    return glm


def _data(kind, n=240, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    eta = 0.3 + X @ [0.5, -0.4, 0.2]
    if kind == "logistic":
        return X, (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float), sm.families.Binomial()
    if kind == "poisson":
        return X, rng.poisson(np.exp(eta)).astype(float), sm.families.Poisson()
    mu = np.exp(eta)  # gamma, log link: dispersion estimated from Pearson's χ²
    return X, rng.gamma(2.0, mu / 2.0), sm.families.Gamma(sm.families.links.Log())


@pytest.mark.parametrize("kind", ["logistic", "poisson", "gamma"])
def test_a_window_over_the_whole_stream_is_the_mle(kind):
    X, y, sm_family = _data(kind)
    link = "log" if kind == "gamma" else None
    glm = _one_pass(X, y, kind, 30, lag=8, link=link)  # 8 batches: all held
    ref = sm.GLM(y, sm.add_constant(X), family=sm_family).fit(tol=1e-13)
    # exact up to the per-batch maximisation's tolerance (a Newton decrement of 1e-8:
    # steps below 1e-4 standard errors)
    assert np.abs((glm.params - ref.params) / ref.bse).max() < 1e-3
    np.testing.assert_allclose(glm.bse, ref.bse, rtol=1e-4)
    assert glm.nobs == 240 and glm.information.num_samples == 240
    assert glm.provenance.startswith("one pass (newton update, lag 8, 8 batches)")
    # a shorter window is not exact on a non-quadratic log-likelihood, but close
    short = _one_pass(X, y, kind, 30, lag=2, link=link)
    dz = np.abs((short.params - ref.params) / ref.bse).max()
    print(f"{kind}: lag 2 of 8 batches lands {dz:.3g} se from the MLE")
    assert 2e-3 < dz < 0.25


@pytest.mark.parametrize("lag", [0, 1, 2, 5])
def test_gaussian_identity_is_exact_for_any_window(lag):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3))
    y = X @ [1.0, -2.0, 0.5] + 0.3 + rng.normal(size=200)
    glm = _one_pass(X, y, "gaussian", 20, lag=lag)
    ref = sm.OLS(y, sm.add_constant(X)).fit()
    np.testing.assert_allclose(glm.params, ref.params, rtol=1e-9)
    np.testing.assert_allclose(glm.bse, ref.bse, rtol=1e-9)
    assert glm.scale == pytest.approx(ref.scale, rel=1e-9)


def test_observed_information_and_diagonal_structure_in_a_window():
    X, y, _ = _data("logistic", seed=2)
    Xc = sm.add_constant(X)
    probit = _one_pass(X, y, "probit", 40, lag=6, cov_type="observed")  # 6 batches: all held
    ref = sm.Probit(y, Xc).fit(disp=0, method="newton", tol=1e-12)  # observed information
    assert np.abs((probit.params - ref.params) / ref.bse).max() < 1e-3
    np.testing.assert_allclose(probit.bse, ref.bse, rtol=1e-4)
    diag = _one_pass(X, y, "logistic", 40, lag=6, structure="diagonal")
    full = sm.GLM(y, Xc, family=sm.families.Binomial()).fit(tol=1e-13)
    assert np.abs((diag.params - full.params) / full.bse).max() < 1e-3
    info = np.linalg.inv(np.asarray(full.cov_params()))
    np.testing.assert_allclose(diag.bse, 1 / np.sqrt(np.diag(info)), rtol=1e-4)


def test_stream_continues_after_refine_from_the_refined_fit():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 2))
    y = X @ [1.5, -0.5] + rng.normal(size=300)
    glm = _one_pass(X[:150], y[:150], "gaussian", 30)
    glm.refine(X[:150], y[:150], progress=False)
    for i in range(150, 300, 30):
        glm.partial_fit(X[i : i + 30], y[i : i + 30])
    ref = sm.OLS(y, sm.add_constant(X)).fit()
    np.testing.assert_allclose(glm.params, ref.params, rtol=1e-9)
    np.testing.assert_allclose(glm.bse, ref.bse, rtol=1e-9)
    assert glm.nobs == 300


def test_lag_is_validated_and_defaults_where_it_applies():
    assert OnlineGLM("poisson").lag == DEFAULT_LAG == 3
    assert OnlineGLM("poisson", forgetting="exponential").lag == 0
    assert OnlineGLM("poisson", update="one_step").lag == 0
    assert OnlineGLM("poisson", lag=np.int64(2)).lag == 2
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(
            ValueError, match=f"lag must be a non-negative integer or None, got {bad!r}"
        ):
            OnlineGLM("poisson", lag=bad)
    with pytest.raises(ValueError, match="lag > 0 needs forgetting=None.*lag=2"):
        OnlineGLM("poisson", lag=2, forgetting="window")
    with pytest.raises(ValueError, match="lag > 0 needs update='newton'.*'one_step'"):
        OnlineGLM("poisson", lag=1, update="one_step")
    assert "lag=3" in repr(OnlineGLM("poisson"))


def test_relinearised_center_matches_the_dense_second_order_expansion():
    """c' is the mean of the Gaussian with the summed gradient and curvature at θ*."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    P = A @ A.T + torch.eye(4, dtype=torch.float64)
    B = torch.randn(4, 4, generator=g, dtype=torch.float64)
    J = B @ B.T
    theta, c, U = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3))
    c_new = relinearised_center(theta, c, P, U, P + J)
    # -½(θ-c')ᵀ(P+J)(θ-c') has gradient (P+J)(c'-θ) at θ*; the terms replaced: U + P(c-θ*)
    torch.testing.assert_close((P + J) @ (c_new - theta), U + P @ (c - theta))


def test_the_window_keeps_its_own_rows_when_the_caller_reuses_a_buffer():
    rng = np.random.default_rng(4)
    X = torch.tensor(rng.normal(size=(200, 2)))
    y = torch.rand(200, generator=torch.Generator().manual_seed(4), dtype=torch.float64) < 0.5
    y = y.to(torch.float64)
    fresh = _one_pass(X, y, "logistic", 40)
    bx, by = torch.empty(40, 2, dtype=torch.float64), torch.empty(40, dtype=torch.float64)
    reused = OnlineGLM("logistic")
    for i in range(0, 200, 40):
        bx.copy_(X[i : i + 40])
        by.copy_(y[i : i + 40])
        reused.partial_fit(bx, by)  # the same buffers, overwritten each batch
    torch.testing.assert_close(reused.params, fresh.params)
