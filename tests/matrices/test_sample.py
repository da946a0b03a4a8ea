"""``sample`` draws from N(0, (F + λI)^-1): the empirical covariance converges."""

from __future__ import annotations

import pytest
import torch

from .cases import DT, STRUCTURE_NAMES, make


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_sample_covariance_converges(structure):
    F = make(structure, "tiny", seed=3)
    damping = 0.5
    target = torch.linalg.inv(F.to_dense() + damping * torch.eye(F.size, dtype=DT))
    errors = []
    for n in (2_000, 50_000):
        x = F.sample(n, damping, generator=torch.Generator().manual_seed(7))
        assert x.shape == (n, F.size)
        cov = x.T @ x / n
        errors.append((torch.linalg.norm(cov - target) / torch.linalg.norm(target)).item())
    # Monte Carlo error shrinks like n^-1/2: ~5x fewer errors with 25x more samples.
    assert errors[1] < 0.03
    assert errors[1] < errors[0]


def test_sample_is_reproducible_with_a_generator():
    F = make("kfac", "mixed")
    a = F.sample(5, 0.1, generator=torch.Generator().manual_seed(0))
    b = F.sample(5, 0.1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_sample_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        make("dense", "tiny").sample(n, 0.1)
