"""``select``: BAIT equals a brute-force greedy log-det; top-k methods; clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import fisherflow as ff
from fisherflow.uncertainty.active import bait_embeddings

TAU, TEMP = 0.5, 0.8


def _setup(structure="dense", params=None, likelihood="categorical", out_dim=3):
    out_dim = 1 if likelihood == "bernoulli" else out_dim
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, out_dim)).double()
    X = torch.randn(6, 2, dtype=torch.float64)
    y = torch.randint(0, out_dim, (6,)) if likelihood == "categorical" else torch.randn(6, out_dim)
    y = y.double() if likelihood == "gaussian" else y
    y = torch.randint(0, 2, (6, 1)).double() if likelihood == "bernoulli" else y
    names = ["2.weight", "2.bias"] if params == "last_layer" else None
    F = ff.estimate(model, [(X, y)], likelihood, "exact", structure, params=names, progress=False)
    la = ff.Laplace(model, likelihood=likelihood, fisher=F, prior_precision=TAU, temperature=TEMP)
    pool = torch.randn(12, 2, dtype=torch.float64) * 1.5
    return model, la, F, pool


def _brute_greedy(model, F, pool, k, likelihood="categorical"):
    """Greedy max of log det(F/T + τI + Σ_S I(x)/T), every candidate recomputed densely."""
    names = list(F.layout.names)
    named = dict(model.named_parameters())
    theta = F.layout.flatten({n: named[n].detach() for n in names})

    def f(th, xi):
        return functional_call(model, F.layout.unflatten(th), (xi[None],))[0]

    infos = []
    for xi in pool:
        J = jacrev(f)(theta, xi).detach()  # (C, P)
        out = f(theta, xi).detach()
        if likelihood == "categorical":
            p = torch.softmax(out, 0)
            lam = torch.diag(p) - torch.outer(p, p)
        elif likelihood == "bernoulli":
            p = torch.sigmoid(out)
            lam = torch.diag(p * (1 - p))
        else:
            lam = torch.eye(out.numel(), dtype=torch.float64)
        infos.append(J.T @ lam @ J / TEMP)
    P = F.layout.size
    prec = F.to_dense() / TEMP + TAU * torch.eye(P, dtype=torch.float64)
    chosen = []
    for _ in range(k):
        base = torch.logdet(prec)
        gains = [
            -float("inf") if i in chosen else float(torch.logdet(prec + infos[i]) - base)
            for i in range(len(pool))
        ]
        best = max(range(len(pool)), key=lambda i: gains[i])
        chosen.append(best)
        prec = prec + infos[best]
    return chosen


@pytest.mark.parametrize(
    ("structure", "params", "likelihood"),
    [
        ("dense", None, "categorical"),
        ("kfac", "last_layer", "categorical"),
        ("diagonal", None, "gaussian"),
        ("block", None, "bernoulli"),
    ],
)
def test_bait_equals_brute_force_greedy(structure, params, likelihood):
    model, la, F, pool = _setup(structure, params, likelihood)
    picked = ff.uncertainty.select(la, pool, 5, "bait", batch_size=5)
    assert picked.tolist() == _brute_greedy(model, F, pool, 5, likelihood)
    assert picked.dtype == torch.long


def test_bait_gains_are_logdet_increments():
    from fisherflow.uncertainty.active import greedy_logdet

    _model, la, _F, pool = _setup()
    V, A = bait_embeddings(la, pool)
    chosen, gains = greedy_logdet(V, A, la.posterior_precision.solve, 4)
    prec = la.posterior_precision.to_dense()
    for i, g in zip(chosen, gains, strict=True):
        new = prec + V[i] @ V[i].T
        assert g == pytest.approx(float(torch.logdet(new) - torch.logdet(prec)), rel=1e-9)
        prec = new


@pytest.mark.parametrize(
    ("method", "score"),
    [("bald", "mutual_information"), ("entropy", "entropy"), ("fisher", "fisher_norm")],
)
def test_top_k_methods(method, score):
    _, la, _, pool = _setup()
    picked = ff.uncertainty.select(
        la, pool, 4, method, n_samples=32, generator=torch.Generator().manual_seed(3)
    )
    s = getattr(
        ff.uncertainty.ood_scores(
            la, pool, n_samples=32, generator=torch.Generator().manual_seed(3)
        ),
        score,
    )
    assert picked.tolist() == torch.argsort(s, descending=True)[:4].tolist()


def test_bad_input():
    _, la, _, pool = _setup()
    with pytest.raises(ValueError, match=r"\['bait', 'bald', 'entropy', 'fisher'\].*'badge'"):
        ff.uncertainty.select(la, pool, 2, "badge")
    for k in (0, 13, 2.0, True):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 12\]"):
            ff.uncertainty.select(la, pool, k)
    with pytest.raises(ValueError, match="pool must hold at least one input"):
        ff.uncertainty.select(la, pool[:0], 1)
    _, gauss, _, pool = _setup(likelihood="gaussian")
    with pytest.raises(ValueError, match="supports the likelihoods"):
        ff.uncertainty.select(gauss, pool, 2, "bald")
