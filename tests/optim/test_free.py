"""Fishers for free: Adam's second moment as the empirical Fisher diagonal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff
from fisherflow.optim import KFAC, fisher_from_optimizer

N, B, D = 2000, 20, 3


def logistic_at_mle() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = (torch.rand(N, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w + 0.3)).double()
    model = nn.Linear(D, 1).double()
    lbfgs = torch.optim.LBFGS(
        model.parameters(),
        max_iter=200,
        tolerance_grad=1e-14,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        loss.backward()
        return loss

    lbfgs.step(closure)
    closure()
    assert all(p.grad.abs().max() < 1e-9 for p in model.parameters())  # at the MLE
    return model, x, y


def test_adam_second_moment_matches_the_empirical_fisher_at_the_mle() -> None:
    # Adam with lr=0 keeps the parameters at the MLE while v tracks the squared
    # mini-batch mean gradient over 10 shuffled epochs (1000 steps, β₂ = 0.999).
    # Expected ratio to the per-example empirical Fisher: the finite-population
    # factor (N−B)/(N−1) = 0.990. Noise: with ḡ near Gaussian (CLT, B = 20) each ḡ²
    # has relative variance 2; the bias-corrected EMA averages ~1000 steps with
    # weights from 0.37 to 1 (effective size ≈ 900), so the relative standard error
    # per coordinate is ≈ √(2/900) ≈ 5%. The tolerance, 20%, is four of those.
    model, x, y = logistic_at_mle()
    adam = torch.optim.Adam(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        perm = torch.randperm(N, generator=g)
        for i in range(0, N, B):
            idx = perm[i : i + B]
            adam.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x[idx])[:, 0], y[idx]).backward()
            adam.step()
    fisher = fisher_from_optimizer(adam, batch_size=B, num_samples=N, model=model)
    reference = ff.estimate(model, [(x, y)], "bernoulli", "empirical", progress=False)
    assert isinstance(fisher, ff.Diagonal) and fisher.kind == "empirical"
    assert fisher.num_samples == N and fisher.layout == reference.layout
    ratio = fisher.diagonal() / reference.diagonal()
    torch.testing.assert_close(ratio, torch.full_like(ratio, (N - B) / (N - 1)), rtol=0.2, atol=0.0)


def test_names_default_to_the_optimizer_order_and_scale_is_n_times_b() -> None:
    p = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    adam = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.5))
    for value in (1.0, 3.0):
        p.grad = torch.full_like(p, value)
        adam.step()
    v_hat = (0.5 * 0.5 * 1.0 + 0.5 * 9.0) / (1 - 0.5**2)  # bias-corrected EMA of g²
    fisher = fisher_from_optimizer(adam, batch_size=4, num_samples=10)
    assert fisher.layout.names == ("param.0",) and fisher.layout.shape("param.0") == (2, 3)
    torch.testing.assert_close(fisher.diagonal(), torch.full((6,), 40 * v_hat, dtype=torch.float64))


def test_natural_gradient_hands_back_its_running_fisher() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = KFAC(model, lr=0.1)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    fisher = fisher_from_optimizer(opt, batch_size=8, num_samples=100)
    assert fisher.structure == "kfac" and fisher.num_samples == pytest.approx(100)
    torch.testing.assert_close(fisher.to_dense(), opt.fisher().to_dense() * (100 / 8))


def test_bad_input_is_named() -> None:
    p = nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        fisher_from_optimizer(sgd, batch_size=0, num_samples=1)
    with pytest.raises(ValueError, match="num_samples"):
        fisher_from_optimizer(sgd, batch_size=1, num_samples=-1)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        fisher_from_optimizer(sgd, batch_size=1, num_samples=1)
    with pytest.raises(TypeError, match="opt"):
        fisher_from_optimizer(object(), batch_size=1, num_samples=1)  # type: ignore[arg-type]
