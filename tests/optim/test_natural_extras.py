"""NaturalGradient: micro-batches, low precision, factored damping, fallback notices."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fisherflow as ff
from fisherflow import optim
from fisherflow.estimation import FallbackNotice
from fisherflow.optim.damping import factored_damping, pi_factor


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


@pytest.mark.parametrize("structure", ["kfac", "dense"])
def test_gradient_accumulation_gives_the_big_batch_curvature(structure: str) -> None:
    x, y = data()
    whole, parts = mlp(), mlp()
    opt_whole = optim.NaturalGradient(whole, lr=0.3, structure=structure, kind="exact")
    opt_parts = optim.NaturalGradient(parts, lr=0.3, structure=structure, kind="exact")
    nn.functional.cross_entropy(whole(x), y).backward()
    opt_whole.step()
    for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):  # four micro-batches of 8
        (nn.functional.cross_entropy(parts(xs), ys) / 4).backward()
    opt_parts.step()
    reference = ff.estimate(mlp(), [(x, y)], "categorical", "exact", structure, progress=False)
    assert opt_parts.fisher().num_samples == 32
    torch.testing.assert_close(opt_parts.fisher().to_dense(), reference.to_dense())
    torch.testing.assert_close(opt_whole.fisher().to_dense(), reference.to_dense())
    for p, q in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["kfac", "dense"])
def test_curvature_rows_estimate_the_first_rows_scaled_to_the_batch(structure: str) -> None:
    x, y = data()
    sub, head = mlp(), mlp()
    opts = [optim.NaturalGradient(m, lr=0.3, structure=structure, kind="exact", **kw)
            for m, kw in ((sub, {"curvature_rows": 12}), (head, {}))]  # fmt: skip
    for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):  # rows 0-11 span two of them
        (nn.functional.cross_entropy(sub(xs), ys) / 4).backward()
    opts[0].step()
    nn.functional.cross_entropy(head(x), y).backward()
    opts[1].step(batch=(x[:12], None))  # the same rows' curvature, unscaled
    first = ff.estimate(mlp(), [(x[:12], None)], "categorical", "exact", structure,
                        progress=False)  # fmt: skip
    fisher = opts[0].fisher()
    assert fisher.num_samples == 32
    torch.testing.assert_close(fisher.to_dense(), first.to_dense() * (32 / 12))
    torch.testing.assert_close(fisher.mean().to_dense(), opts[1].fisher().mean().to_dense())
    for p, q in zip(sub.parameters(), head.parameters(), strict=True):  # the same step
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_first_rows_cut_dict_batches_and_keep_all_without_a_limit() -> None:
    from fisherflow.optim.inputs import first_rows

    ids = torch.arange(10).reshape(5, 2)
    batches = [{"input_ids": ids[:3], "labels": ids[:3]}, {"input_ids": ids[3:], "labels": ids[3:]}]
    kept, used, total = first_rows(batches, 4)
    assert (used, total) == (4, 5) and len(kept) == 2
    assert torch.equal(kept[1]["input_ids"], ids[3:4]) and torch.equal(kept[1]["labels"], ids[3:4])
    assert first_rows(batches, None) == (batches, 0, 0)
    assert first_rows(batches, 9) == (batches, 5, 5)


def test_ekfac_streams_a_batch_again_past_the_replay_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fisherflow.estimation import accumulate

    x, y = data()
    reference = ff.estimate(mlp(), [(x, y)], "categorical", "exact", "ekfac", progress=False)
    monkeypatch.setattr(accumulate, "REPLAY_BYTES", 0)  # a batch too large to replay
    model = mlp()
    opt = optim.EKFAC(model, lr=0.1, kind="exact")
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # raised "needs another pass over the same data" before
    torch.testing.assert_close(opt.fisher().to_dense(), reference.to_dense())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_keep_float32_curvature(dtype: torch.dtype) -> None:
    model = mlp(dtype)
    opt = optim.KFAC(model, lr=0.1, update_freq=1, damping=0.1)
    x, y = data()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        opt.step()
    fisher = opt.fisher()
    assert fisher.dtype == torch.float32
    assert all(f.dtype == torch.float32 for f in (*fisher.A.values(), *fisher.G.values()))
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    reference = ff.estimate(
        model, [(x.to(dtype), None)], "categorical", "mc", "kfac", progress=False
    )
    assert reference.dtype == torch.float32


def test_factored_damping_is_the_pi_formula() -> None:
    x, y = data()
    y = y % 2
    model = nn.Linear(3, 2).double()
    lam = 0.3
    opt = optim.KFAC(model, lr=1.0, kind="exact", damping=lam, damping_mode="factored")
    fisher = ff.estimate(model, [(x, y)], "categorical", "exact", "kfac", progress=False)
    nn.functional.cross_entropy(model(x), y).backward()
    g = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)  # (n_out, n_in + 1)
    before = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], 1)
    opt.step()
    A = next(iter(fisher.A.values()))
    G = next(iter(fisher.G.values())) / 32  # the per-observation Fisher of a mean loss
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    assert pi_factor(A, G) == pytest.approx(pi)
    eye_a, eye_g = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
    damped_a, damped_g = A + pi * math.sqrt(lam) * eye_a, G + math.sqrt(lam) / pi * eye_g
    step = torch.linalg.solve(damped_g, g) @ torch.linalg.inv(damped_a)  # (G_d ⊗ A_d)⁻¹ g
    after = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], 1)
    torch.testing.assert_close(after, before - step, rtol=1e-10, atol=1e-12)
    # the damped matrix is the exact damping plus the cross term
    dense = factored_damping(fisher.mean(), lam).to_dense()
    expected = (
        torch.kron(G, A)
        + math.sqrt(lam) * (pi * torch.kron(G, eye_a) + torch.kron(eye_g, A) / pi)
        + lam * torch.eye(dense.shape[0], dtype=dense.dtype)
    )
    order = [i * 4 + j for i in range(2) for j in range(3)] + [i * 4 + 3 for i in range(2)]
    torch.testing.assert_close(dense, expected[order][:, order])


def test_factored_damping_needs_kfac() -> None:
    with pytest.raises(ValueError, match="damping_mode"):
        optim.NaturalGradient(mlp(), lr=0.1, structure="diagonal", damping_mode="factored")
    with pytest.raises(ValueError, match="damping_mode"):
        optim.KFAC(mlp(), lr=0.1, damping_mode="pi")


class Scale(nn.Module):
    """A layer K-FAC has no rule for: its parameter falls back to a diagonal block."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_uncapturable_layer_falls_back_to_a_diagonal_with_one_notice() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = optim.KFAC(model, lr=0.1, update_freq=1)
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    notices = [w for w in caught if issubclass(w.category, FallbackNotice)]
    assert len(notices) == 1 and "'1'" in str(notices[0].message)
    fisher = opt.fisher()
    assert fisher.structure == "kfac" and fisher.rest_names == ["1.w"]
    assert opt.steps == 3


@pytest.mark.parametrize("structure", ["block", "dense"])
def test_dense_and_block_factorize_once_per_refresh(
    structure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between curvature updates the preconditioner is fixed, so its damped inverse is
    # formed once (O(P³)) and each step costs a product (O(P²)); the steps are still
    # exactly −lr (F + λI)⁻¹ g with the refreshed F.
    from fisherflow.matrices import linalg

    calls = []
    real = linalg.equilibrated_solve

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(linalg, "equilibrated_solve", counted)  # dense and block solve here
    x, y = data()
    model = mlp()
    opt = optim.NaturalGradient(
        model, lr=0.3, structure=structure, kind="exact", damping=0.1, update_freq=3
    )
    blocks = 1 if structure == "dense" else 2
    for step in range(1, 5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        F = opt._preconditioner.to_dense()  # the preconditioner this step used
        eye = torch.eye(theta.numel(), dtype=torch.float64)
        expected = theta - 0.3 * torch.linalg.solve(F + 0.1 * eye, grad)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(after, expected, rtol=1e-9, atol=1e-12)
        refreshes = 1 if step < 4 else 2  # updates at steps 1 and 4
        assert len(calls) == refreshes * blocks
