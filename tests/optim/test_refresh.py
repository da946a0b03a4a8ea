"""``eigen_refresh="power"``: one power iteration + QR from the last eigenbasis.

On a curvature that does not move, the power refresh from an exact eigenbasis is
exact, so K-FAC and Shampoo take the same steps as with an eigendecomposition at every
refresh; the option is validated; the fused finiteness check keeps its meaning.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherflow import optim
from fisherflow.optim.curvature import tensors_finite
from fisherflow.optim.eigenbasis import eigenpairs


def test_power_refresh_from_an_eigenbasis_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    vals = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    factor = (q * vals) @ q.T
    start = q[:, torch.randperm(5, generator=g)]  # the same basis, columns shuffled
    got_vals, got = eigenpairs(factor, start, "power")
    torch.testing.assert_close(got_vals, vals, rtol=0, atol=1e-12)  # descending
    torch.testing.assert_close((got * got_vals) @ got.T, factor, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.T @ got, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)


def _least_squares(refresh: str) -> nn.Module:
    """K-FAC steps on a Gaussian linear model: its curvature does not depend on the weights."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.randn(64, 3, generator=g, dtype=torch.float64)
    opt = optim.KFAC(
        model, lr=0.5, likelihood="gaussian", kind="exact", damping=1e-3, update_freq=1,
        eigen_refresh=refresh,
    )  # fmt: skip
    for _ in range(5):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
        opt.step()
    return model


def test_kfac_power_refresh_equals_eigh_on_a_fixed_curvature() -> None:
    eigh, power = _least_squares("eigh"), _least_squares("power")
    for a, b in zip(eigh.parameters(), power.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _shampoo(refresh: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = optim.Shampoo([p], lr=0.1, precondition_frequency=1, eigen_refresh=refresh)
    for _ in range(4):  # the same gradient: L and R keep their eigenvectors
        p.grad = grad.clone()
        opt.step()
    return p.detach()


def test_shampoo_power_refresh_equals_eigh_when_the_factors_keep_their_basis() -> None:
    torch.testing.assert_close(_shampoo("power"), _shampoo("eigh"), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"structure": "ekfac"}, "structure='kfac'"),
        ({"damping_mode": "factored"}, "damping_mode='exact'"),
        ({"eigen_refresh": "qr"}, r"eigen_refresh must be one of \['eigh', 'power'\]"),
    ],
)
def test_power_refresh_is_validated(options: dict[str, str], message: str) -> None:
    kw = {"eigen_refresh": "power", **options}
    with pytest.raises(ValueError, match=message):
        optim.NaturalGradient(nn.Linear(2, 2), lr=0.1, **kw)  # type: ignore[arg-type]


def test_finiteness_check_tells_huge_from_infinite() -> None:
    assert tensors_finite([torch.ones(3), torch.full((2,), 3e38)])  # 2-norm overflows
    assert not tensors_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not tensors_finite([torch.tensor([float("-inf")], dtype=torch.bfloat16)])
    assert tensors_finite([]) and tensors_finite([torch.zeros(0)])
