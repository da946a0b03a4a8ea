import numpy as np
import pytest
import torch
from scipy import stats as sps

from fisherflow.flow import (
    LOCATIONS,
    Estimate,
    RankDeficiencyWarning,
    coordinate_median,
    fuse,
    robust_fuse,
    trimmed_mean,
    weiszfeld,
)
from fisherflow.matrices import Diagonal, ParamLayout

from .conftest import DT, batch_estimate, linear_gaussian

N_SOURCES, P = 11, 3
TRUTH_SEED = 0


def clean_sources(n=N_SOURCES, seed=0):
    out = []
    for i in range(n):
        X, y, _ = linear_gaussian(n=200, p=P, sigma=1.0, seed=1000 * seed + 0)  # same beta
        g = torch.Generator().manual_seed(7919 * seed + i)
        X = torch.randn(200, P, generator=g, dtype=DT)
        beta = linear_gaussian(n=2, p=P, seed=seed)[2]
        y = X @ beta + torch.randn(200, generator=g, dtype=DT)
        out.append(batch_estimate(X, y, 1.0))
    return out, beta


def attack(kind, src, beta, rng):
    theta, info = src
    se = torch.linalg.inv(info).diagonal().sqrt()
    if kind == "huge_claim_far":
        return beta + 100.0, 1e6 * info
    if kind == "huge_claim_near":
        return beta + 1.0, 1e8 * info
    if kind == "random_far":
        return torch.from_numpy(rng.normal(0, 1e3, P)), info
    if kind == "tiny_claim_far":
        return beta - 1e4, 1e-6 * info
    if kind == "subtle_shift":  # just inside the detection radius of one source
        return theta + 1.2 * se, info
    raise KeyError(kind)


ATTACKS = ["huge_claim_far", "huge_claim_near", "random_far", "tiny_claim_far", "subtle_shift"]


def metric_dist(a, b, M):
    d = a - b
    return float(d @ M @ d) ** 0.5


@pytest.mark.parametrize("method", sorted(LOCATIONS))
@pytest.mark.parametrize("kind", ATTACKS)
def test_robust_fuse_bounded_under_attack(method, kind):
    rng = np.random.default_rng(0)
    sources, beta = clean_sources()
    f = (N_SOURCES - 1) // 2 if method != "trimmed_mean" else 2  # f < n/2 (trim: floor(.2 n))
    bad = list(range(0, 2 * f, 2))[:f]
    corrupted = [attack(kind, s, beta, rng) if i in bad else s for i, s in enumerate(sources)]
    clean = fuse([s for i, s in enumerate(sources) if i not in bad])
    plain = fuse(corrupted)
    robust = robust_fuse(corrupted, method=method)
    M = torch.stack([s[1] for s in sources]).median(0).values  # one source's information
    bound = float(sps.chi2.isf(1e-3, P)) ** 0.5  # the outlier-test radius, 4.03
    d_rob = metric_dist(robust.params, clean.params, M)
    d_plain = metric_dist(plain.params, clean.params, M)
    print(
        f"{method:16s} {kind:16s} f={f}: robust {d_rob:.3f}  plain {d_plain:.3g}  "
        f"(bound {bound:.2f})"
    )
    assert d_rob <= bound
    # tiny information claims only hurt themselves; a subtle shift hides in the noise
    if kind not in ("subtle_shift", "tiny_claim_far"):
        assert d_plain > (10 if "far" in kind else 3) * bound
        assert {d.index for d in robust.downweighted} >= set(bad)
        for d in robust.downweighted:
            assert d.reason
    assert robust.breakdown_point >= f / N_SOURCES


def test_robust_fuse_equals_fuse_without_corruption():
    sources, _ = clean_sources()
    a, b = fuse(sources), robust_fuse(sources)
    assert b.downweighted == []
    torch.testing.assert_close(a.params, b.params)
    torch.testing.assert_close(a.information.to_dense(), b.information.to_dense())
    assert b.breakdown_point == 5 / 11


def test_weiszfeld_closed_forms():
    pts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=DT)
    c, _ = weiszfeld(pts, torch.eye(2, dtype=DT))
    torch.testing.assert_close(c, torch.tensor([1.0, 1.0], dtype=DT))
    # the median lies on a data point: the Vardi-Zhang step stays there
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=DT)
    c, _ = weiszfeld(pts, torch.diag(torch.tensor([1.0, 4.0], dtype=DT)))
    torch.testing.assert_close(c, torch.zeros(2, dtype=DT), atol=1e-8, rtol=0)
    assert coordinate_median(pts).tolist() == [0.0, 0.0]
    assert trimmed_mean(torch.tensor([[1.0], [2.0], [3.0], [1e9]]), 0.25).tolist() == [2.5]


def test_fuse_forms_and_errors():
    lay = ParamLayout.from_shapes({"a": (1,), "b": (1,)})
    e1 = Estimate(
        {"a": torch.tensor([0.0]), "b": torch.tensor([1.0])}, Diagonal(torch.ones(2), lay)
    )
    e2 = Estimate(
        {"a": torch.tensor([2.0]), "b": torch.tensor([1.0])}, Diagonal(torch.ones(2), lay)
    )
    out = fuse([e1, e2])
    assert out.params["a"].item() == 1.0 and isinstance(out.information, Diagonal)
    with pytest.raises(ValueError, match="non-empty"):
        fuse([])
    with pytest.raises(ValueError, match="layout"):
        fuse([(torch.zeros(2), torch.eye(2)), (torch.zeros(3), torch.eye(3))])
    with pytest.raises(ValueError, match="NaN"):
        fuse([(torch.tensor([float("nan")]), torch.eye(1))])
    with pytest.raises(TypeError):
        fuse([torch.zeros(2)])
    with pytest.raises(ValueError, match="method must be one of"):
        robust_fuse([(torch.zeros(1), torch.eye(1))], method="mean")
    with pytest.raises(ValueError, match="trim"):
        robust_fuse([(torch.zeros(1), torch.eye(1))], method="trimmed_mean", trim=0.6)
    with pytest.warns(RankDeficiencyWarning):
        fuse([(torch.zeros(2, dtype=DT), torch.zeros(2, 2, dtype=DT))])
