"""``gram_eigh``: eigenpairs of ``XᵀX`` from ``X`` agree with the dense ``eigh``."""

from __future__ import annotations

import pytest
import torch

from fisherflow.matrices.linalg import gram_eigh


@pytest.mark.parametrize(("m", "n"), [(1, 5), (3, 17), (8, 40), (20, 30), (30, 20)])
def test_matches_dense_eigh(m, n):
    """Few rows (thin SVD + WY null space) or many (dense eigh): same decomposition."""
    gen = torch.Generator().manual_seed(m * 100 + n)
    x = torch.randn(m, n, generator=gen, dtype=torch.float64)
    gram = x.T @ x
    vals, vecs = gram_eigh(x)
    assert vals.shape == (n,) and vecs.shape == (n, n)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close((vecs * vals) @ vecs.T, gram)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(gram), atol=1e-10, rtol=1e-10)
    assert bool((vals[1:] >= vals[:-1] - 1e-12).all())  # ascending, like eigh


def test_axis_aligned_rows_and_float32():
    """A singular vector on a coordinate axis (Householder τ = 0) and float32 inputs."""
    x = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    vals, vecs = gram_eigh(x)
    torch.testing.assert_close((vecs * vals) @ vecs.T, x.T @ x)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(7, dtype=torch.float64))
    x32 = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    vals32, vecs32 = gram_eigh(x32)
    assert vals32.dtype == torch.float32
    err = ((vecs32 * vals32) @ vecs32.T - x32.T @ x32).abs().max() / (x32.T @ x32).abs().max()
    assert err < 1e-5


def test_rejects_non_finite():
    with pytest.raises(ValueError, match="NaN or Inf"):
        gram_eigh(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
