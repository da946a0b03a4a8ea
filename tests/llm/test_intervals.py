"""Next-token intervals: frequentist coverage on a well-specified model, fast path exactness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff

CONTEXTS, D, V = 40, 4, 5


class TinyLM(nn.Module):
    """A frozen context embedding and a trainable output layer: logits (B, T, V)."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(features, freeze=True)
        self.head = nn.Linear(features.shape[1], V)

    def forward(self, ids):
        return self.head(self.embed(ids))


def _truth(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(CONTEXTS, D, generator=gen, dtype=torch.float64)
    W = torch.randn(V, D, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    return features, torch.softmax(features @ W.T + b, -1)


def _fit_mle(features, probs, n, seed):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, CONTEXTS, (n,), generator=gen)
    nxt = torch.multinomial(probs[ctx], 1, generator=gen)[:, 0]
    model = TinyLM(features).double()
    opt = torch.optim.LBFGS(
        model.parameters(),
        max_iter=100,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ctx), nxt, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    return model, [(ctx[:, None], nxt[:, None])]


@pytest.mark.parametrize("method", ["linearized", "sample"])
def test_coverage_of_90_percent_intervals(method):
    features, probs = _truth()
    ids = torch.arange(CONTEXTS)[None]
    hits = []
    for rep in range(10):
        model, data = _fit_mle(features, probs, 2000, seed=100 + rep)
        la = ff.Laplace(
            model,
            likelihood="categorical",
            structure="dense",
            params="last_layer",
            prior_precision=1e-6,
        )
        la.fit(data, progress=False)
        iv = ff.llm.token_intervals(
            la,
            ids,
            level=0.9,
            top_k=3,
            method=method,
            n_samples=200,
            generator=torch.Generator().manual_seed(rep),
        )
        truth = probs[ids[0]].gather(1, iv.token_ids[0])
        hits.append((iv.lower[0] <= truth) & (truth <= iv.upper[0]))
    coverage = float(torch.cat(hits).double().mean())
    assert 0.85 <= coverage <= 0.95, coverage


@pytest.mark.parametrize("structure", ["kfac", "ekfac", "diagonal"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_fast_last_layer_path_equals_the_jacobian_path(structure, temperature):
    features, probs = _truth(1)
    model, data = _fit_mle(features, probs, 500, seed=3)
    la = ff.Laplace(
        model,
        likelihood="categorical",
        structure=structure,
        params="last_layer",
        prior_precision=0.3,
        temperature=temperature,
    ).fit(data, progress=False)
    F = la.fisher
    dense = ff.Dense(F.to_dense(), F.layout, **F.meta)  # same matrix, general path
    ref = ff.Laplace(
        model,
        likelihood="categorical",
        fisher=dense,
        params="last_layer",
        prior_precision=0.3,
        temperature=temperature,
    )
    ids = torch.arange(CONTEXTS).reshape(4, 10)
    fast = ff.llm.token_intervals(la, ids, top_k=4)
    slow = ff.llm.token_intervals(ref, ids, top_k=4)
    assert fast.mean.shape == (4, 10, 4)
    torch.testing.assert_close(fast.token_ids, slow.token_ids)
    for name in ("mean", "lower", "upper"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-9, atol=1e-12)
    # the sampled intervals agree with the linearized ones up to the linearisation (a few
    # far-out tails differ by more) and Monte Carlo error
    drawn = ff.llm.token_intervals(
        la,
        ids,
        top_k=4,
        method="sample",
        n_samples=2000,
        generator=torch.Generator().manual_seed(0),
    )
    for name in ("lower", "upper", "mean"):
        gap = (getattr(drawn, name) - getattr(fast, name)).abs()
        assert float(gap.median()) < 0.01 and float(gap.max()) < 0.1


def test_bad_input():
    features, probs = _truth()
    model, data = _fit_mle(features, probs, 200, seed=0)
    la = ff.Laplace(model, likelihood="categorical", params="last_layer")
    ids = torch.arange(5)[None]
    with pytest.raises(ValueError, match="call fit"):
        ff.llm.token_intervals(la, ids)
    la.fit(data, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        ff.llm.token_intervals(la, ids, method="delta")
    with pytest.raises(ValueError, match="level must be"):
        ff.llm.token_intervals(la, ids, level=1.5)
    with pytest.raises(ValueError, match="top_k must be at most"):
        ff.llm.token_intervals(la, ids, top_k=V + 1)
    gauss = ff.Laplace(
        model,
        likelihood="gaussian",
        fisher=la.fisher.__class__._from_state(
            la.fisher.layout, *la.fisher._state(), num_samples=1.0
        ),
    )
    with pytest.raises(ValueError, match="categorical likelihood"):
        ff.llm.token_intervals(gauss, ids)


def test_cached_output_layer_variances_follow_prior_and_temperature():
    features, probs = _truth(1)
    model, data = _fit_mle(features, probs, 300, seed=4)
    la = ff.Laplace(model, likelihood="categorical", params="last_layer", structure="diagonal")
    la.fit(data, progress=False)
    ids = torch.arange(CONTEXTS).reshape(4, 10)
    ff.llm.token_intervals(la, ids, top_k=3)  # fills the cache at tau = 1, T = 1
    la.prior_precision, la.temperature = 4.0, 0.5
    ref = ff.Laplace(
        model,
        likelihood="categorical",
        fisher=ff.Dense(la.fisher.to_dense(), la.fisher.layout, **la.fisher.meta),
        params="last_layer",
        prior_precision=4.0,
        temperature=0.5,
    )
    got, want = ff.llm.token_intervals(la, ids, top_k=3), ff.llm.token_intervals(ref, ids, top_k=3)
    for name in ("mean", "lower", "upper"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-12)
