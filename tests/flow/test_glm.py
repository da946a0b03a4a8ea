import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import torch

from fisherflow.flow import Batches, OnlineGLM

REL = 1e-6


def _binary_fair():
    d = sm.datasets.fair.load_pandas().data
    y = (d["affairs"] > 0).astype(float)
    X = d.drop(columns=["affairs"])
    return X, y


def _spector():
    d = sm.datasets.spector.load_pandas()
    return d.exog, d.endog


def _randhie():
    d = sm.datasets.randhie.load_pandas()
    return d.exog, d.endog


def _star98():
    d = sm.datasets.star98.load_pandas()
    return d.exog, d.endog  # endog: (NABOVE, NBELOW)


CASES = {
    "spector-logit": (_spector, "logistic", sm.families.Binomial(), 8),
    "fair-logit": (_binary_fair, "logistic", sm.families.Binomial(), 500),
    "randhie-poisson": (_randhie, "poisson", sm.families.Poisson(), 2000),
    "star98-binomial": (_star98, "binomial", sm.families.Binomial(), 50),
}


def stream_fit(X, y, family, batch, **kw):
    glm = OnlineGLM(family, **kw)
    for Xb, yb, _ in Batches(X, y, batch_size=batch):
        glm.partial_fit(Xb, yb)
    first = glm.params.copy()
    glm.refine(Batches(X, y, batch_size=batch))
    return glm, first


def max_rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_statsmodels(case):
    loader, family, sm_family, batch = CASES[case]
    X, y = loader()
    glm, first = stream_fit(X, y, family, batch)
    ref = sm.GLM(y, sm.add_constant(X, prepend=True), family=sm_family).fit(tol=1e-13)
    assert list(glm.params.index) == list(ref.params.index)
    rp, rb = max_rel(glm.params, ref.params), max_rel(glm.bse, ref.bse)
    print(f"{case}: params rel {rp:.2e}, bse rel {rb:.2e}, passes {glm.n_iter}")
    assert rp < REL and rb < REL
    assert glm.converged
    assert glm.nobs == len(X)
    assert np.isfinite(first).all()
    assert glm.llf == pytest.approx(ref.llf, rel=1e-9)  # binomial: with log C(n, k)
    ci = glm.conf_int()
    np.testing.assert_allclose(ci.values, ref.conf_int().values, rtol=1e-6)
    np.testing.assert_allclose(glm.cov_params().values, ref.cov_params().values, rtol=1e-5)


def test_spector_logit_discrete_model_and_summary():
    X, y = _spector()
    glm, _ = stream_fit(X, y, "logistic", 8)
    ref = sm.Logit(y, sm.add_constant(X)).fit(disp=0, method="newton", tol=1e-12)
    assert max_rel(glm.params, ref.params) < REL and max_rel(glm.bse, ref.bse) < REL
    text = glm.summary()
    assert "GPA" in text and "std err" in text and "const" in text


def test_probit_matches_statsmodels_glm():
    X, y = _spector()
    glm, _ = stream_fit(X, y, "probit", 8)
    link = sm.families.links.Probit()
    ref = sm.GLM(y, sm.add_constant(X), family=sm.families.Binomial(link=link)).fit(tol=1e-13)
    assert max_rel(glm.params, ref.params) < REL and max_rel(glm.bse, ref.bse) < 1e-5


def test_gaussian_is_exact_recursive_least_squares():
    d = sm.datasets.longley.load_pandas()
    X, y = d.exog[["GNPDEFL", "UNEMP", "ARMED"]], d.endog
    glm = OnlineGLM("gaussian")
    for Xb, yb, _ in Batches(X, y, batch_size=3):
        glm.partial_fit(Xb, yb)
    ref = sm.OLS(y, sm.add_constant(X)).fit()
    assert max_rel(glm.params, ref.params) < 1e-8  # no refine needed: RLS is exact
    assert max_rel(glm.bse, ref.bse) < 1e-7
    assert glm.scale == pytest.approx(ref.scale, rel=1e-8)


def test_inputs_numpy_tensor_pandas_and_prediction():
    X, y = _spector()
    Xn, yn = X.to_numpy(), y.to_numpy()
    a = OnlineGLM("logistic").partial_fit(Xn, yn).refine([(Xn, yn)])
    b = OnlineGLM("logistic").partial_fit(torch.tensor(Xn), torch.tensor(yn))
    b.refine(lambda: iter([(torch.tensor(Xn), torch.tensor(yn))]))
    assert isinstance(a.params, np.ndarray) and isinstance(b.params, torch.Tensor)
    np.testing.assert_allclose(a.params, b.params.numpy(), rtol=1e-10)
    p = a.predict(Xn[:5])
    lo, hi = a.predict_interval(Xn[:5], alpha=0.1)
    assert np.all((lo <= p) & (p <= hi) & (lo >= 0) & (hi <= 1))
    # the delta-method interval for the linear predictor, mapped through the logistic
    xc = np.c_[np.ones(5), Xn[:5]]
    se = np.sqrt(np.einsum("ij,jk,ik->i", xc, a.cov_params(), xc))
    eta = xc @ a.params
    np.testing.assert_allclose(hi, 1 / (1 + np.exp(-(eta + 1.6448536269514722 * se))), rtol=1e-9)
    pt = b.predict(torch.tensor(Xn[:5]))
    assert isinstance(pt, torch.Tensor)
    assert isinstance(OnlineGLM().partial_fit(X, y).predict(X.iloc[:3]), pd.Series) is False


def test_information_and_weights():
    X, y = _spector()
    w = np.arange(1, 33) % 3 + 1.0
    a = OnlineGLM("logistic").refine([(X, y, w)])
    rep = X.loc[X.index.repeat(w.astype(int))]
    b = OnlineGLM("logistic").refine([(rep, y.loc[rep.index])])
    np.testing.assert_allclose(a.params, b.params, rtol=1e-9)
    np.testing.assert_allclose(a.bse, b.bse, rtol=1e-9)
    assert a.information.num_samples == w.sum()


def test_coverage_500_logistic_datasets():
    """One-pass 95% intervals (no refine) cover the truth 93-97% of the time."""
    true = np.array([-0.5, 1.0, -1.0])
    rng = np.random.default_rng(12345)
    hits = np.zeros(3)
    reps, n, batch = 500, 200, 40  # 5 batches: two leave the default 3-batch window
    X = rng.normal(size=(reps, n, 2))
    p = 1 / (1 + np.exp(-(true[0] + X @ true[1:])))
    Y = (rng.random((reps, n)) < p).astype(float)
    for x, y in zip(X, Y, strict=True):
        glm = OnlineGLM("logistic")
        for i in range(0, n, batch):
            glm.partial_fit(x[i : i + batch], y[i : i + batch])
        ci = glm.conf_int(0.05)
        hits += (ci[:, 0] <= true) & (true <= ci[:, 1])
    cov = hits / reps
    print("one-pass coverage per coefficient:", cov, "pooled:", cov.mean())
    # pooled over 1500 intervals: nominal 95% must land in 93-97%; each coefficient
    # (500 intervals, binomial sd ~1%) within a 2.5-sd band of 95%
    assert 0.93 <= cov.mean() <= 0.97
    assert np.all((cov >= 0.925) & (cov <= 0.975)), cov


def test_no_warnings_on_clean_fit():
    X, y = _spector()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream_fit(X, y, "logistic", 8)
