import pytest
import torch

from fisherflow.flow import Estimate, FisherFlow, fuse
from fisherflow.matrices import Block, Dense, Diagonal

from .conftest import DT, batch_estimate, batch_score, linear_gaussian

SIGMA = 0.7


def splits(n, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(slice(i, min(i + s, n)))
        i += s
        if i >= n:
            break
    if i < n:
        out.append(slice(i, n))
    return out


def pooled(X, y, prior_mean=None, prior_prec=None):
    A = X.T @ X / SIGMA**2
    b = X.T @ y / SIGMA**2
    if prior_prec is not None:
        A = A + prior_prec
        b = b + prior_prec @ prior_mean
    return torch.linalg.solve(A, b), A


SIZE_PLANS = [[120], [7, 13, 40, 60], [1] * 10 + [30], [3, 50, 2, 2, 63]]


@pytest.mark.parametrize("sizes", SIZE_PLANS)
@pytest.mark.parametrize("order_seed", [0, 1])
@pytest.mark.parametrize("rule", ["update_estimate", "step"])
def test_sequential_equals_pooled_and_posterior(sizes, order_seed, rule):
    X, y, _ = linear_gaussian(sigma=SIGMA)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(order_seed))
    X, y = X[perm], y[perm]
    p = X.shape[1]
    m0 = torch.linspace(-1, 1, p, dtype=DT)
    L0 = torch.diag(torch.linspace(0.5, 2.0, p, dtype=DT))
    for prior in (False, True):
        flow = FisherFlow(m0.clone(), L0.clone()) if prior else FisherFlow(torch.zeros(p, dtype=DT))
        for sl in splits(X.shape[0], sizes):
            Xb, yb = X[sl], y[sl]
            if rule == "update_estimate":
                flow.update_estimate(*batch_estimate(Xb, yb, SIGMA))
            else:
                flow.step(*batch_score(Xb, yb, flow.params, SIGMA))
        want, A = pooled(X, y, m0, L0) if prior else pooled(X, y)
        torch.testing.assert_close(flow.params, want, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(flow.information.to_dense(), A, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(flow.covariance(), torch.linalg.inv(A), rtol=1e-8, atol=1e-12)


def test_fusion_of_shards_equals_pooled():
    X, y, _ = linear_gaussian(sigma=SIGMA)
    shards = [slice(0, 30), slice(30, 31), slice(31, 90), slice(90, 120)]
    ests = [batch_estimate(X[s], y[s], SIGMA) for s in shards]
    fused = fuse(ests)
    want, A = pooled(X, y)
    torch.testing.assert_close(fused.params, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fused.information.to_dense(), A)
    # fusing per-shard flows gives the same, and order does not matter
    flows = []
    for s in shards:
        f = FisherFlow(torch.zeros(X.shape[1], dtype=DT))
        f.step(*batch_score(X[s], y[s], f.params, SIGMA))
        flows.append(f)
    torch.testing.assert_close(fuse(flows[::-1]).params, want, rtol=1e-8, atol=1e-10)
    assert isinstance(fused, Estimate)
    torch.testing.assert_close(fused.bse(), torch.linalg.inv(A).diagonal().sqrt())


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block"])
def test_structures_dict_params(structure):
    X, y, _ = linear_gaussian(p=3, sigma=SIGMA)
    params = {"a": torch.zeros(2, dtype=DT), "b": torch.zeros(1, dtype=DT)}
    flow = FisherFlow(params, structure=structure)
    for s in (slice(0, 60), slice(60, 120)):
        g, info = batch_score(X[s], y[s], flow.layout.flatten(flow.params), SIGMA)
        flow.step(flow.layout.unflatten(g), info)
    cls = {"dense": Dense, "diagonal": Diagonal, "block": Block}[structure]
    assert isinstance(flow.information, cls)
    assert set(flow.params) == {"a", "b"}
    assert flow.num_samples == 0  # raw tensors carry no sample count
    if structure == "dense":
        want, _ = pooled(X, y)
        torch.testing.assert_close(flow.layout.flatten(flow.params), want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        flow.information.diagonal(), (X.T @ X).diagonal() / SIGMA**2, rtol=1e-10, atol=1e-10
    )


def test_num_samples_and_metadata_travel():
    X, y, _ = linear_gaussian(sigma=SIGMA)
    flow = FisherFlow(torch.zeros(4, dtype=DT))
    lay = flow.layout
    for s in (slice(0, 50), slice(50, 120)):
        g, info = batch_score(X[s], y[s], flow.params, SIGMA)
        n = s.stop - s.start
        flow.step(g, Dense(info, lay, num_samples=n, kind="exact", likelihood="gaussian"))
    assert flow.num_samples == 120
    assert flow.information.kind == "exact" and flow.information.likelihood == "gaussian"
    assert "FisherFlow(P=4" in repr(flow)


def test_shaped_tensor_params_keep_shape():
    flow = FisherFlow(torch.zeros(2, 2, dtype=DT))
    flow.update_estimate(torch.ones(2, 2, dtype=DT), torch.eye(4, dtype=DT))
    assert flow.params.shape == (2, 2)
    torch.testing.assert_close(flow.params, torch.ones(2, 2, dtype=DT))
    assert flow.bse().shape == (2, 2)


@pytest.mark.parametrize("kind", ["observed", "empirical", "expected"])
def test_from_log_likelihood_logistic(kind):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 2, dtype=DT, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -0.5], dtype=DT)), generator=g)

    def ll(theta, data):
        Xb, yb = data
        eta = Xb @ theta
        return yb * eta - torch.nn.functional.softplus(eta)

    def sampler(theta, data, gen):
        Xb, _ = data
        return Xb, torch.bernoulli(torch.sigmoid(Xb @ theta), generator=gen)

    flow = FisherFlow.from_log_likelihood(
        ll, torch.zeros(2, dtype=DT), information=kind, sampler=sampler, mc_samples=4
    )
    theta = torch.zeros(2, dtype=DT)
    flow.observe((X, y), generator=torch.Generator().manual_seed(0))
    mu = torch.sigmoid(X @ theta)
    score = X.T @ (y - mu)
    exact = (X * (mu * (1 - mu))[:, None]).T @ X
    info = flow.information.to_dense()
    if kind == "observed":  # canonical link: observed == expected information
        torch.testing.assert_close(info, exact)
        torch.testing.assert_close(flow.params, torch.linalg.solve(exact, score))
        assert flow.information.kind is None
    elif kind == "empirical":
        r = (y - mu)[:, None] * X
        torch.testing.assert_close(info, r.T @ r)
        assert flow.information.kind == "empirical"
    else:
        assert flow.information.kind == "mc"
        assert torch.allclose(info, exact, rtol=0.2)
    assert flow.num_samples == 400


def test_from_log_likelihood_errors():
    with pytest.raises(ValueError, match="information must be one of"):
        FisherFlow.from_log_likelihood(lambda t, d: t, torch.zeros(1), information="fisher")
    with pytest.raises(ValueError, match="sampler"):
        FisherFlow.from_log_likelihood(lambda t, d: t, torch.zeros(1), information="expected")
    with pytest.raises(RuntimeError, match="from_log_likelihood"):
        FisherFlow(torch.zeros(1)).observe(None)
