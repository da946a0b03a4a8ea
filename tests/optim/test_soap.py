"""Shampoo and SOAP against closed forms and dense float64 references.

Shampoo's step is the grafted ``L^e M R^e``; SOAP with a fixed basis is Adam on the
rotated parameter, with no basis it is Adam one step late; the basis refresh
converges to the factor's eigenvectors; ``basis="kfac"`` rotates by the eigenvectors
of :func:`fisherflow.estimate`'s K-FAC factors; each ``fisher()`` is the documented
Kronecker Fisher; conv kernels are preconditioned as their ``(out, in·k²)`` matrix;
low-precision models keep float32 statistics.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff
from fisherflow import optim
from fisherflow.optim.curvature import update_seed
from fisherflow.optim.eigenbasis import eigenbasis, matrix_root, refresh_eigenbasis


def grads(steps: int, shape: tuple[int, ...] = (4, 3), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def run(opt: torch.optim.Optimizer, p: torch.Tensor, gs: list[torch.Tensor]) -> None:
    for g in gs:
        p.grad = g.clone()
        opt.step()


def dense_root(m: torch.Tensor, e: float, eps: float) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag((vals.clamp_min(0) + eps) ** e) @ vecs.T


@pytest.mark.parametrize(("exponent", "graft"), [(-0.25, "adam"), (-0.5, "none")])
def test_shampoo_step_is_the_grafted_kronecker_root(exponent: float, graft: str) -> None:
    gs = grads(3)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    p = nn.Parameter(x0.clone())
    b1, b2, eps, lr = 0.9, 0.8, 1e-6, 0.1
    opt = optim.Shampoo(
        [p], lr=lr, betas=(b1, b2), eps=eps, exponent=exponent, graft=graft,
        precondition_frequency=1,
    )  # fmt: skip
    run(opt, p, gs)
    x = x0.clone()
    m = v = torch.zeros(4, 3, dtype=torch.float64)
    L, R = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    for t, g in enumerate(gs, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        L, R = b2 * L + (1 - b2) * g @ g.T, b2 * R + (1 - b2) * g.T @ g
        c1, c2 = 1 - b1**t, 1 - b2**t
        d = dense_root(L / c2, exponent, eps) @ (m / c1) @ dense_root(R / c2, exponent, eps)
        if graft == "adam":
            a = (m / c1) / ((v / c2).sqrt() + eps)
            d = d * a.norm() / d.norm()
        x = x - lr * d
    torch.testing.assert_close(p.detach(), x, rtol=1e-10, atol=1e-12)


def test_shampoo_on_a_vector_is_adam() -> None:
    gs = grads(5, (6,))
    p, q = nn.Parameter(torch.ones(6, dtype=torch.float64)), nn.Parameter(torch.ones(6))
    q = nn.Parameter(torch.ones(6, dtype=torch.float64))
    run(optim.Shampoo([p], lr=0.1, eps=1e-8), p, gs)
    run(torch.optim.Adam([q], lr=0.1, eps=1e-8), q, gs)
    torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)  # ε placement differs by √ĉ₂


def test_soap_without_a_basis_is_adam_one_step_late() -> None:
    # max_precond_dim=1: no side gets a basis; the first step only initialises
    gs = grads(6)
    p = nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
    q = nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
    soap = optim.SOAP([p], lr=0.05, betas=(0.9, 0.99), eps=1e-12, weight_decay=0.0,
                      max_precond_dim=1)  # fmt: skip
    run(soap, p, gs)
    run(torch.optim.Adam([q], lr=0.05, betas=(0.9, 0.99), eps=1e-12), q, gs[1:])
    torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_soap_with_a_fixed_basis_is_adam_on_the_rotated_parameter() -> None:
    # The basis is built from the first gradient's factors and never refreshed: the
    # iterates are Q_L Z Q_Rᵀ with Z trained by Adam on the rotated gradients.
    gs = grads(6)
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    soap = optim.SOAP([p], lr=0.05, betas=(0.9, 0.99), eps=1e-12, weight_decay=0.0,
                      precondition_frequency=1000)  # fmt: skip
    run(soap, p, gs)
    g0 = gs[0]
    ql = torch.linalg.eigh(g0 @ g0.T).eigenvectors.flip(-1)
    qr = torch.linalg.eigh(g0.T @ g0).eigenvectors.flip(-1)
    z = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    run(torch.optim.Adam([z], lr=0.05, betas=(0.9, 0.99), eps=1e-12),
        z, [ql.T @ g @ qr for g in gs[1:]])  # fmt: skip
    torch.testing.assert_close(p.detach(), ql @ z.detach() @ qr.T, rtol=1e-8, atol=1e-10)


def test_refresh_keeps_an_eigenbasis_and_converges_to_one() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    p = a @ a.T
    exact = eigenbasis(p)
    q, order = refresh_eigenbasis(p, exact)
    assert order.tolist() == list(range(5))
    torch.testing.assert_close((q.T @ exact).abs(), torch.eye(5, dtype=torch.float64))
    q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64)).Q
    for _ in range(300):
        q, _ = refresh_eigenbasis(p, q)
    off = q.T @ p @ q
    assert (off - torch.diag(off.diagonal())).abs().max() < 1e-8 * p.norm()
    vals = off.diagonal()
    assert torch.all(vals[:-1] >= vals[1:])  # descending, as SOAP orders them


def test_matrix_root_retries_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    # float32 eigh failing (as it does on ill-conditioned factors) falls back to float64
    original = torch.linalg.eigh
    calls: list[torch.dtype] = []

    def flaky(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated float32 failure")
        return original(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    factor = torch.diag(torch.tensor([16.0, 1.0, 81.0]))
    root = matrix_root(factor, -0.25, 0.0)
    assert calls == [torch.float32, torch.float64] and root.dtype == torch.float32
    torch.testing.assert_close(root, torch.diag(torch.tensor([0.5, 1.0, 1 / 3])))


def test_shampoo_fisher_is_the_scaled_kronecker_product() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = optim.Shampoo(model.named_parameters(), lr=0.1, betas=(0.9, 0.5))
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    fisher = opt.fisher(batch_size=8, num_samples=100)
    w = model[0].weight.grad
    left, right = w @ w.T, w.T @ w  # one step: the bias-corrected factors
    block = 100 * 8 * torch.kron(left, right) / left.trace()
    dense = fisher.to_dense()
    torch.testing.assert_close(dense[:12, :12], block, rtol=1e-10, atol=1e-12)
    bias = model[0].bias.grad
    torch.testing.assert_close(dense[12:16, 12:16], torch.diag(800 * bias**2))
    assert (fisher.structure, fisher.kind, fisher.num_samples) == ("kfac", "empirical", 100)
    free = ff.fisher_from_optimizer(opt, batch_size=8, num_samples=100)
    torch.testing.assert_close(free.to_dense(), dense)


def test_soap_fisher_is_the_second_moment_in_the_basis() -> None:
    gs = grads(4)
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = optim.SOAP([("w", p)], lr=0.01, betas=(0.9, 0.7), precondition_frequency=1000)
    run(opt, p, gs)
    state = opt.state[p]
    ql, qr, v = state["QL"], state["QR"], state["exp_avg_sq"] / (1 - 0.7**3)
    basis = torch.kron(ql, qr)
    expected = 32 * basis @ torch.diag(16 * v.reshape(-1)) @ basis.T
    fisher = opt.fisher(batch_size=16, num_samples=32)
    assert fisher.structure == "ekfac" and fisher.layout.names == ("w",)
    torch.testing.assert_close(fisher.to_dense(), expected, rtol=1e-10, atol=1e-12)


def test_soap_kfac_rotates_by_the_estimated_kfac_eigenvectors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    reference = ff.estimate(
        model, [(x, None)], "categorical", "mc", "kfac", seed=update_seed(5, 1), progress=False
    )
    opt = optim.SOAP(model.parameters(), lr=0.01, basis="kfac", model=model, seed=5)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    fisher = opt.fisher()
    assert (fisher.structure, fisher.kind, fisher.num_samples) == ("kfac", "mc", 32)
    torch.testing.assert_close(fisher.to_dense(), reference.to_dense(), rtol=0, atol=0)
    for layer, weight, bias in (("0", model[0].weight, model[0].bias),
                                ("2", model[2].weight, model[2].bias)):  # fmt: skip
        A, G = reference.A[layer], reference.G[layer]
        state = opt.state[weight]
        n_in = weight.shape[1]
        for q, factor in ((state["QL"], G), (state["QR"], A[:n_in, :n_in])):
            rotated = q.T @ factor @ q  # diagonal in the basis, eigenvalues descending
            torch.testing.assert_close(rotated, torch.diag(rotated.diagonal()), atol=1e-10,
                                       rtol=0)  # fmt: skip
            assert torch.all(rotated.diagonal()[:-1] >= rotated.diagonal()[1:] - 1e-12)
        assert torch.equal(opt.state[bias]["QL"], state["QL"])
    assert "QR" not in opt.state[bias]


def test_soap_kfac_micro_batches_give_the_big_batch_factors() -> None:
    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    whole, parts = fresh(), fresh()
    opts = [optim.SOAP(m.parameters(), lr=0.01, basis="kfac", model=m, kind="exact")
            for m in (whole, parts)]  # fmt: skip
    parts(torch.randn(5, 3, dtype=torch.float64)).sum()  # a stale forward, cleared below
    opts[1].zero_grad()
    nn.functional.cross_entropy(whole(x), y).backward()
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):  # two micro-batches of 4
        (nn.functional.cross_entropy(parts(xs), ys) / 2).backward()
    for opt in opts:
        opt.step()
    reference = ff.estimate(fresh(), [(x, None)], "categorical", "exact", "kfac", progress=False)
    for opt in opts:
        fisher = opt.fisher()
        assert fisher.num_samples == 8
        for layer in ("0", "2"):
            torch.testing.assert_close(fisher.A[layer], reference.A[layer], rtol=1e-12, atol=0)
            torch.testing.assert_close(fisher.G[layer], reference.G[layer], rtol=1e-12, atol=1e-15)
    for p, q in zip(whole.parameters(), parts.parameters(), strict=True):
        for key in ("QL", "QR"):
            if key in opts[0].state[p]:
                torch.testing.assert_close(opts[1].state[q][key], opts[0].state[p][key],
                                           rtol=0, atol=1e-10)  # fmt: skip
        # Adam's first step is lr·Γ'/(|Γ'| + ε): round-off in Γ' grows by 1/|Γ'|
        torch.testing.assert_close(q, p, rtol=0, atol=1e-9)


def test_conv_kernels_are_preconditioned_as_their_matrix_view() -> None:
    conv = nn.Conv2d(2, 3, 2).double()
    opt = optim.Shampoo(conv.named_parameters(), lr=0.1, betas=(0.9, 0.0))
    conv(torch.randn(4, 2, 5, 5, dtype=torch.float64)).square().mean().backward()
    opt.step()
    state = opt.state[conv.weight]
    g = conv.weight.grad.reshape(3, 8)
    torch.testing.assert_close(state["L"], g @ g.T)
    torch.testing.assert_close(state["R"], g.T @ g)
    assert "L" not in opt.state[conv.bias]


def test_sides_beyond_max_precond_dim_keep_the_identity() -> None:
    emb = nn.Embedding(50, 4).double()
    opt = optim.SOAP(emb.named_parameters(), lr=0.1, max_precond_dim=10)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    state = opt.state[emb.weight]
    assert "QL" not in state and state["QR"].shape == (4, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["shampoo", "soap", "soap-kfac"])
def test_low_precision_models_keep_float32_statistics(dtype: torch.dtype, name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    build = {
        "shampoo": lambda: optim.Shampoo(model.parameters(), lr=0.01, model=model),
        "soap": lambda: optim.SOAP(model.parameters(), lr=0.01, model=model),
        "soap-kfac": lambda: optim.SOAP(model.parameters(), lr=0.01, model=model, basis="kfac"),
    }
    opt = build[name]()
    x, y = torch.randn(16, 3).to(dtype), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    state = opt.state_dict()
    resumed = build[name]()
    resumed.load_state_dict(state)
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for value in resumed.state[p].values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.float32
    fisher = opt.fisher(batch_size=16)
    assert fisher.dtype == torch.float32
