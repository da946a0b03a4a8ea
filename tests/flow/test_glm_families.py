"""GLM families against R-verified fits shipped in statsmodels' test suite.

Reference numbers come from ``statsmodels/genmod/tests/results/results_glm.py`` (R's
``glm`` and ``summary.glm``; R's ``logLik`` is given there in comments, or follows
from its ``aic_R``). R stops at a deviance change of 1e-8, so its coefficients carry
about five significant digits; each case is also compared, tightly, with statsmodels'
GLM fitted to 1e-12 with Pearson's dispersion (R's rule).
"""

import warnings

import numpy as np
import pytest
import statsmodels.api as sm
from statsmodels.genmod.tests.results import results_glm as R

from fisherflow.flow import Batches, OnlineGLM

links = sm.families.links


def _scotland():
    d = sm.datasets.scotland.load()
    res = R.Scotvote()
    return np.asarray(d.exog, float), np.asarray(d.endog, float), res, -82.47352


def _committee():
    d = sm.datasets.committee.load()
    ex = np.asarray(d.exog, float).copy()
    ex[:, 2] = np.log(ex[:, 2])
    return np.column_stack((ex, ex[:, 2] * ex[:, 1])), np.asarray(d.endog, float), R.Committee()


def _gaussian_log():
    x = np.arange(100)
    rs = np.random.RandomState(54321)
    y = np.exp(-(-1.0 + 0.02 * x + 0.0001 * x**2)) + 0.001 * rs.randn(100)
    return np.c_[x, x**2], y


def _case(name):
    """``(X without constant, y, family, link, R result, R logLik, constant first?, sm family)``."""
    if name == "gamma-inverse":
        X, y, res, ll = _scotland()
        return X, y, "gamma", None, res, ll, False, sm.families.Gamma()
    if name in ("gamma-log", "gamma-identity"):
        res = R.CancerLog() if name == "gamma-log" else R.CancerIdentity()
        link = name.split("-")[1]
        ll = -160.94511197686035 if link == "log" else -159.19604559476483
        sm_link = links.Log() if link == "log" else links.Identity()
        return (
            res.exog[:, :-1],
            res.endog,
            "gamma",
            link,
            res,
            ll,
            False,
            sm.families.Gamma(sm_link),
        )
    if name == "inverse_gaussian":
        res = R.InvGauss()
        fam = sm.families.InverseGaussian()
        return (
            res.exog[:, :-1],
            res.endog,
            "inverse_gaussian",
            None,
            res,
            -2525.70955823223,
            False,
            fam,
        )
    if name in ("inverse_gaussian-log", "inverse_gaussian-identity"):
        link = name.split("-")[1]
        res = R.InvGaussLog() if link == "log" else R.InvGaussIdentity()
        ll = -9268.9182107979905 if link == "log" else -9275.3386384410078
        data = R.Medpar1()
        sm_link = links.Log() if link == "log" else links.Identity()
        fam = sm.families.InverseGaussian(sm_link)
        return data.exog[:, :-1], data.endog, "inverse_gaussian", link, res, ll, False, fam
    if name == "negative_binomial":
        X, y, res = _committee()
        return (
            X,
            y,
            "negative_binomial",
            None,
            res,
            res.llf,
            False,
            sm.families.NegativeBinomial(alpha=1.0),
        )
    if name == "gaussian-log":
        X, y = _gaussian_log()
        res = R.GaussianLog()
        return X, y, "gaussian", "log", res, res.llf, True, sm.families.Gaussian(links.Log())
    if name == "gaussian-longley":
        d = sm.datasets.longley.load()
        res = R.Longley()
        X, y = np.asarray(d.exog, float), np.asarray(d.endog, float)
        return X, y, "gaussian", None, res, res.llf, False, sm.families.Gaussian()
    raise KeyError(name)


CASES = [
    "gamma-inverse",
    "gamma-log",
    "gamma-identity",
    "inverse_gaussian",
    "inverse_gaussian-log",
    "inverse_gaussian-identity",
    "negative_binomial",
    "gaussian-log",
    "gaussian-longley",
]


def _const_last(v, const_first):
    v = np.asarray(v, float)
    return v if const_first else np.r_[v[1:], v[0]]


@pytest.mark.parametrize("name", CASES)
def test_family_reproduces_r_and_streams_without_error(name):
    X, y, family, link, res, ll_r, const_first, sm_family = _case(name)
    batch = 5 if len(y) < 200 else 250
    glm = OnlineGLM(family, link=link)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # streaming in small batches: no error, no warning
        for Xb, yb, _ in Batches(X, y, batch_size=batch):
            glm.partial_fit(Xb, yb)
        assert np.isfinite(glm.params).all() and np.isfinite(glm.bse).all()
        glm.refine(Batches(X, y, batch_size=batch))
    assert glm.converged and glm.provenance.startswith("refine")
    params, bse = _const_last(glm.params, const_first), _const_last(glm.bse, const_first)
    # R: coefficients to its own convergence (~1e-4 relative), standard errors likewise
    np.testing.assert_allclose(params, res.params, rtol=3e-4, atol=1e-7)
    np.testing.assert_allclose(bse, res.bse, rtol=3e-4)
    assert glm.scale == pytest.approx(res.scale, rel=1e-4)
    assert glm.llf == pytest.approx(ll_r, rel=1e-7, abs=1e-5)  # R's logLik
    # statsmodels, converged tightly, with Pearson's dispersion (R's summary.glm)
    Xs = sm.add_constant(X, prepend=const_first, has_constant="add")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sm.GLM(y, Xs, family=sm_family).fit(scale="x2", tol=1e-13, maxiter=500)
    np.testing.assert_allclose(params, ref.params, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(bse, ref.bse, rtol=1e-6)
    assert glm.scale == pytest.approx(ref.scale, rel=1e-6)
    assert glm.df_resid == ref.df_resid


def test_fit_equals_refine_and_arrays_equal_batches():
    X, y, *_ = _case("gamma-log")
    a = OnlineGLM("gamma", link="log").fit(X, y)
    b = OnlineGLM("gamma", link="log").refine(Batches(X, y, batch_size=7))
    np.testing.assert_allclose(a.params, b.params, rtol=1e-9)
    np.testing.assert_allclose(a.bse, b.bse, rtol=1e-9)
    assert a.provenance.startswith("fit") and a.nobs == len(y)
    # fit drops what was streamed before
    c = OnlineGLM("gamma", link="log").partial_fit(X[:20] * 3, y[:20]).fit(X, y)
    np.testing.assert_allclose(c.params, a.params, rtol=1e-9)


def test_observed_information_matches_newton_hessian():
    X, y, *_ = _case("gamma-log")
    glm = OnlineGLM("gamma", link="log", cov_type="observed").fit(X, y)
    Xs = sm.add_constant(X, prepend=True)
    ref = sm.GLM(y, Xs, family=sm.families.Gamma(links.Log()))
    ref = ref.fit(method="newton", tol=1e-13, maxiter=200, scale="x2")  # OIM covariance
    exp = OnlineGLM("gamma", link="log").fit(X, y)
    np.testing.assert_allclose(glm.params, ref.params, rtol=1e-6)
    np.testing.assert_allclose(glm.bse, ref.bse, rtol=1e-5)
    assert np.abs(glm.bse / exp.bse - 1).max() > 1e-3  # non-canonical: they differ
    assert "observed" in glm.summary()


def test_probit_observed_matches_statsmodels_discrete():
    d = sm.datasets.spector.load_pandas()
    glm = OnlineGLM("probit", cov_type="observed").fit(d.exog, d.endog)
    ref = sm.Probit(d.endog, sm.add_constant(d.exog)).fit(disp=0, method="newton", tol=1e-12)
    np.testing.assert_allclose(glm.params, ref.params, rtol=1e-7)
    np.testing.assert_allclose(glm.bse, ref.bse, rtol=1e-6)


def test_exposure_and_offset_reproduce_r():
    d = sm.datasets.cpunish.load()
    X = np.asarray(d.exog, float).copy()
    X[:, 3] = np.log(X[:, 3])
    y = np.asarray(d.endog, float)
    res = R.Cpunish_offset()
    a = OnlineGLM("poisson").fit(X, y, exposure=np.full(len(y), 100.0))
    np.testing.assert_allclose(a.params, res.params, rtol=1e-5)
    np.testing.assert_allclose(a.bse, res.bse, rtol=2e-3)  # R's bse printed to 4 digits
    b = OnlineGLM("poisson")
    for batch in Batches(X, y, batch_size=7, offset=np.full(len(y), np.log(100.0))):
        b.partial_fit(**batch)
    b.refine(Batches(X, y, batch_size=7, offset=np.full(len(y), np.log(100.0))))
    np.testing.assert_allclose(b.params, a.params, rtol=1e-8)
    mu = b.predict(X[:3], exposure=np.full(3, 100.0))
    np.testing.assert_allclose(mu, a.predict(X[:3], offset=np.full(3, np.log(100.0))))
    with pytest.raises(ValueError, match="exposure needs the log link"):
        OnlineGLM("gamma").partial_fit(X, y + 1, exposure=np.ones(len(y)))
    with pytest.raises(ValueError, match="exposure must be > 0"):
        OnlineGLM("poisson").partial_fit(X, y, exposure=np.zeros(len(y)))


def test_freq_and_var_weights_as_statsmodels_defines_them():
    X, y, *_ = _case("gamma-log")
    rng = np.random.default_rng(3)
    f = rng.integers(1, 4, len(y)).astype(float)
    v = rng.uniform(0.5, 2.0, len(y))
    Xs = sm.add_constant(X, prepend=True)
    fam = sm.families.Gamma(links.Log())
    for kw in ({"freq_weights": f}, {"var_weights": v}, {"freq_weights": f, "var_weights": v}):
        glm = OnlineGLM("gamma", link="log").fit(X, y, **kw)
        ref = sm.GLM(y, Xs, family=fam, **kw).fit(tol=1e-13, maxiter=200)
        np.testing.assert_allclose(glm.params, ref.params, rtol=1e-6)
        np.testing.assert_allclose(glm.bse, ref.bse, rtol=1e-6)
        assert glm.nobs == pytest.approx(ref.model.wnobs) and glm.df_resid == pytest.approx(
            ref.df_resid
        )
    # frequency weights are repeated rows; variance weights are not
    rep = np.repeat(np.arange(len(y)), f.astype(int))
    a = OnlineGLM("gamma", link="log").fit(X, y, freq_weights=f)
    b = OnlineGLM("gamma", link="log").fit(X[rep], y[rep])
    np.testing.assert_allclose(a.bse, b.bse, rtol=1e-8)
    with pytest.raises(ValueError, match="not both"):
        OnlineGLM("gamma").partial_fit(X, y, sample_weight=f, freq_weights=f)


def test_poisson_llf_with_weights_matches_statsmodels():
    d = sm.datasets.cpunish.load()
    X = np.asarray(d.exog, float).copy()
    X[:, 3] = np.log(X[:, 3])
    y = np.asarray(d.endog, float)
    f = np.arange(len(y)) % 3 + 1.0
    glm = OnlineGLM("poisson").fit(X, y, freq_weights=f)
    ref = sm.GLM(y, sm.add_constant(X), family=sm.families.Poisson(), freq_weights=f).fit(tol=1e-13)
    assert glm.llf == pytest.approx(ref.llf, rel=1e-9)


def test_binomial_llf_counts_the_binomial_coefficient_as_r_does():
    """Star98 (successes, failures out of up to ~700 trials): R's logLik -2998.6126."""
    d = sm.datasets.star98.load_pandas()
    res = R.Star98()
    glm = OnlineGLM("binomial").fit(d.exog, d.endog, progress=False)
    np.testing.assert_allclose(glm.params.iloc[1:], res.params[:-1], rtol=1e-6)
    np.testing.assert_allclose(glm.bse.iloc[1:], res.bse[:-1], rtol=1e-6)
    assert glm.llf == pytest.approx(res.llf, rel=1e-10)  # -2998.61255899391, from R
    # proportions with the trials as var_weights: the same model and log-likelihood
    trials = d.endog.sum(axis=1).to_numpy()
    prop = d.endog.iloc[:, 0].to_numpy() / trials
    same = OnlineGLM("binomial").fit(d.exog, prop, var_weights=trials, progress=False)
    assert same.llf == pytest.approx(res.llf, rel=1e-10)
    # with one trial per row the coefficient is 0: the bernoulli log-likelihood
    X, y = sm.datasets.spector.load_pandas().exog, sm.datasets.spector.load_pandas().endog
    one = OnlineGLM("binomial").fit(X, y, progress=False)
    assert one.llf == pytest.approx(OnlineGLM("bernoulli").fit(X, y, progress=False).llf)


def test_family_link_and_alpha_errors():
    with pytest.raises(
        ValueError, match=r"link for family 'gamma' must be one of \['inverse_power'"
    ):
        OnlineGLM("gamma", link="logit")
    with pytest.raises(ValueError, match="alpha applies to family 'negative_binomial' only"):
        OnlineGLM("poisson", alpha=2.0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        OnlineGLM("negative_binomial", alpha=0.0)
    with pytest.raises(ValueError, match="y must be > 0"):
        OnlineGLM("gamma").partial_fit(np.ones((2, 1)), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="cov_type must be one of"):
        OnlineGLM(cov_type="robust")
    with pytest.raises(ValueError, match="update must be one of"):
        OnlineGLM(update="sgd")
    with pytest.raises(ValueError, match="scale"):
        OnlineGLM(scale=0.0)


def test_one_pass_with_observed_information_is_near_the_observed_fit():
    """Laplace propagation: each batch adds its negative Hessian at the new estimate."""
    data = R.Medpar1()
    X, y = data.exog[:, :-1], data.endog
    glm = OnlineGLM("gamma", link="log", cov_type="observed")
    for Xb, yb, _ in Batches(X, y, batch_size=250):
        glm.partial_fit(Xb, yb)
    full = OnlineGLM("gamma", link="log", cov_type="observed").fit(X, y)
    assert np.abs((glm.params - full.params) / full.bse).max() < 0.25
    assert np.abs(glm.bse / full.bse - 1).max() < 0.05


@pytest.mark.parametrize(("family", "link"), [("inverse_gaussian", None), ("gamma", "identity")])
def test_links_valid_only_for_positive_eta_stream_in_tiny_batches(family, link):
    """The estimate so far can give a negative mean on the next rows: a valid start is found."""
    data = R.Medpar1()
    X, y = data.exog[:300, :-1], np.asarray(data.endog)[:300]  # in file order
    glm = OnlineGLM(family, link=link)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for Xb, yb, _ in Batches(X, y, batch_size=5):
            glm.partial_fit(Xb, yb)
    assert glm.nobs == 300 and np.isfinite(glm.params).all()
