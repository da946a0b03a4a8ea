"""A one-shot estimate hands its sums to the result: the same factors as a copying build."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherflow.estimation import FisherEstimator, estimate
from fisherflow.estimation.grams import FACTOR_BLOCK, as_rows, gram_into, symmetrize
from fisherflow.matrices.validate import all_finite


def _cnn() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A convolution, then a linear layer whose input factor (side 257) is blocked."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).double()
    assert 4 * 8 * 8 + 1 >= FACTOR_BLOCK
    data = [
        (torch.randn(n, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (5, 3)
    ]
    return model, data


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_one_shot_factors_equal_the_copying_build(kind):
    """``estimate`` (sums handed over) equals ``result()`` (sums copied), bit for bit."""
    model, data = _cnn()
    F = estimate(model, data, "categorical", kind, "kfac", progress=False)
    est = FisherEstimator(model, "categorical", kind, "kfac")
    for batch in data:
        est.update(batch)
    first, second = est.result(), est.result()  # the statistics survive a build
    for g in F.A:  # type: ignore[attr-defined]
        for got in (first, second):
            assert torch.equal(F.A[g], got.A[g])  # type: ignore[attr-defined]
            assert torch.equal(F.G[g], got.G[g])  # type: ignore[attr-defined]
        torch.testing.assert_close(F.A[g], F.A[g].T, rtol=1e-14, atol=1e-15)  # type: ignore[attr-defined]
    # the last layer: A the mean of [a, 1][a, 1]ᵀ over rows, G (exact kind) the summed
    # output Fisher Σ_n (diag p − p pᵀ)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        a = model[:3](x)
        p = torch.softmax(model(x), -1)
    at = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    torch.testing.assert_close(F.A["3"], at.T @ at / len(a), rtol=1e-12, atol=1e-14)  # type: ignore[attr-defined]
    if kind == "exact":
        G = torch.diag(p.sum(0)) - p.T @ p
        torch.testing.assert_close(F.G["3"], G, rtol=1e-12, atol=1e-14)  # type: ignore[attr-defined]


def test_ekfac_basis_diagonalises_the_handed_over_factors():
    """EKFAC's first-pass factors (handed to its basis) are K-FAC's; its basis diagonalises them."""
    model, data = _cnn()
    E = estimate(model, data, "categorical", "exact", "ekfac", progress=False)
    K = estimate(model, data, "categorical", "exact", "kfac", progress=False)
    q = E.QA["0"]  # type: ignore[attr-defined]  # eigh of the 19-wide factor of 512 patches
    d = q.T @ K.A["0"] @ q  # type: ignore[attr-defined]
    off = d - torch.diag(torch.diagonal(d))
    assert float(off.abs().max()) < 1e-12 * float(d.abs().max())
    qg = E.QG["3"]  # type: ignore[attr-defined]
    dg = qg.T @ K.G["3"] @ qg  # type: ignore[attr-defined]
    assert float((dg - torch.diag(torch.diagonal(dg))).abs().max()) < 1e-12 * float(dg.abs().max())


def test_final_result_needs_a_new_update():
    """After handing its sums over, the estimator refuses another result until fed."""
    model, data = _cnn()
    est = FisherEstimator(model, "categorical", "empirical", "kfac")
    est.update(data[0])
    F = est._final_result()
    with pytest.raises(RuntimeError, match="update"):
        est.result()
    est.reset()
    est.update(data[0])
    again = est.result()
    for g in F.A:  # type: ignore[attr-defined]
        assert torch.equal(F.A[g], again.A[g])  # type: ignore[attr-defined]


def test_as_rows_copies_strided_rows_column_major():
    """Rows of a channel-first gradient: equal values, a transposed contiguous copy."""
    d = torch.randn(3, 5, 4, 4, dtype=torch.float64).reshape(3, 5, 16).transpose(1, 2)
    rows = as_rows(d)
    assert torch.equal(rows, d.reshape(-1, 5))
    assert rows.T.is_contiguous()
    x = torch.randn(6, 7)
    assert as_rows(x).data_ptr() == x.data_ptr()  # contiguous rows: a view
    acc = symmetrize(gram_into(None, d, factor=True), factor=True)
    torch.testing.assert_close(acc, d.reshape(-1, 5).T @ d.reshape(-1, 5), rtol=1e-14, atol=0)


@pytest.mark.parametrize("side", [300, 600])
def test_symmetrize_strips_equal_the_full_product(side):
    """Blocked upper triangles mirrored strip by strip give the full Gram matrix."""
    x = torch.randn(40, side, dtype=torch.float64)
    for factor in (False, True):
        got = symmetrize(gram_into(None, x, ones=True, factor=factor), factor=factor)
        xt = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(got, xt.T @ xt, rtol=1e-13, atol=1e-13)


def test_all_finite_one_number_for_many_tensors():
    """One reduction decides; overflowing sums and complex tensors are still right."""
    big = torch.full((4,), 3e38)  # finite entries whose float32 sum overflows
    assert all_finite(big)
    assert all_finite(torch.ones(2), torch.ones(2, dtype=torch.float64))
    assert all_finite(torch.tensor([1 + 2j]), torch.ones(1))
    assert not all_finite(torch.ones(2), torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([complex(1.0, float("inf"))]))
    assert all_finite()
