"""EWC: the penalty against the dense formula, online EWC against Fisher Flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherflow as ff
from fisherflow.flow import Exponential

STRUCTURES = ("dense", "diagonal", "block", "kfac", "ekfac", "lowrank")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.LayerNorm(2)).double()


def _data(seed: int = 0, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (n,), generator=g),
        )
    ]


def _fisher(model, structure, seed=0):
    return ff.estimate(
        model, _data(seed), "categorical", "exact", structure, rank=3, progress=False
    )


def _flat(model):
    return torch.cat([p.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_penalty_and_gradient_equal_dense_formula(structure):
    model = _model()
    F = _fisher(model, structure)
    D = F.to_dense()
    anchor = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    ewc = ff.apps.EWC(F, anchor, strength=2.5)
    pen = ewc.penalty(model)
    model.zero_grad()
    pen.backward()
    delta = (_flat(model) - F.layout.flatten(anchor)).detach()
    torch.testing.assert_close(pen.detach(), 0.5 * 2.5 * delta @ D @ delta, rtol=1e-12, atol=1e-14)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(g, 2.5 * D @ delta, rtol=1e-12, atol=1e-14)


def test_anchor_forms_agree_and_float32_model():
    model = _model()
    F = _fisher(model, "kfac")
    other = _model(1)
    pens = [
        ff.apps.EWC(F, a).penalty(model) for a in (other, other.state_dict(), _flat(other).detach())
    ]
    assert pens[0] > 0 and torch.equal(pens[0], pens[1]) and torch.equal(pens[0], pens[2])
    # a float32 model: the penalty comes back in float32 and still differentiates
    ewc = ff.apps.EWC(F, other)
    pen32 = ewc.penalty(model.float())
    assert pen32.dtype == torch.float32
    torch.testing.assert_close(pen32.double(), pens[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "kfac"])
def test_online_ewc_is_the_fisher_flow_state(structure):
    models = [_model(s) for s in range(3)]
    Fs = [_fisher(m, structure, seed=s) for s, m in enumerate(models)]
    gamma = 0.6
    ewc = ff.apps.EWC(Fs[0], models[0], anchor_rule="fused")
    flow = ff.FisherFlow(
        models[0].state_dict(), Fs[0], structure=structure, forgetting=Exponential(gamma)
    )
    for m, F in zip(models[1:], Fs[1:], strict=True):
        ewc.consolidate(F, m, decay=gamma)
        flow.update_estimate(m.state_dict(), F)
    torch.testing.assert_close(ewc.fisher.to_dense(), flow.information.to_dense())
    torch.testing.assert_close(ewc.flat_anchor, flow.flat_params)


def test_online_ewc_fused_closed_form():
    """Dense, full rank: F = γ²F₁ + γF₂ + F₃, θ* = F⁻¹(γ²F₁θ₁ + γF₂θ₂ + F₃θ₃)."""
    g = torch.Generator().manual_seed(3)
    layout = ff.ParamLayout.from_shapes({"w": (2, 2), "b": (2,)})
    Ds, thetas = [], []
    for _ in range(3):
        R = torch.randn(6, 6, generator=g, dtype=torch.float64)
        Ds.append(R @ R.T + 0.1 * torch.eye(6, dtype=torch.float64))
        thetas.append(torch.randn(6, generator=g, dtype=torch.float64))
    gamma = 0.6
    ewc = ff.apps.EWC(ff.Dense(Ds[0], layout), thetas[0], anchor_rule="fused")
    for D, t in zip(Ds[1:], thetas[1:], strict=True):
        ewc.consolidate(ff.Dense(D, layout), t, decay=gamma)
    total = gamma**2 * Ds[0] + gamma * Ds[1] + Ds[2]
    h = gamma**2 * Ds[0] @ thetas[0] + gamma * Ds[1] @ thetas[1] + Ds[2] @ thetas[2]
    torch.testing.assert_close(ewc.fisher.to_dense(), total)
    torch.testing.assert_close(ewc.flat_anchor, torch.linalg.solve(total, h))


def test_latest_anchor_rule_one_penalty_of_all_tasks():
    models = [_model(s) for s in range(3)]
    Fs = [_fisher(m, "diagonal", seed=s) for s, m in enumerate(models)]
    ewc = ff.apps.EWC(Fs[0], models[0], strength=3.0)  # anchor_rule="latest"
    ewc.consolidate(Fs[1], models[1], decay=0.5).consolidate(Fs[2], models[2], decay=0.5)
    total = 0.25 * Fs[0].diagonal() + 0.5 * Fs[1].diagonal() + Fs[2].diagonal()
    torch.testing.assert_close(ewc.fisher.diagonal(), total)
    torch.testing.assert_close(ewc.flat_anchor, _flat(models[2]).detach())
    probe = _model(7)
    delta = (_flat(probe) - _flat(models[2])).detach()
    torch.testing.assert_close(ewc.penalty(probe).detach(), 1.5 * (total * delta**2).sum())


def test_fisher_is_per_example_not_batch_mean_squared():
    """Avalanche's EWC squares each mini-batch's mean gradient: about B times too small.

    At a fitted model the mean score is ~0, so (mean of B scores)² ≈ Var/B, while the
    Fisher is the mean of the squared per-example scores. ``ff.estimate`` (which EWC
    consumes) must give the latter; the batch-mean version is shown B times smaller.
    """
    torch.manual_seed(0)
    n, B = 2048, 32
    x = torch.randn(n, 4, dtype=torch.float64)
    y = (
        x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
        + torch.randn(n, dtype=torch.float64)
        > 0
    ).long()
    model = nn.Linear(4, 2).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    batches = [(x[i : i + B], y[i : i + B]) for i in range(0, n, B)]
    F = ff.estimate(model, batches, "categorical", "empirical", "diagonal", progress=False)
    per_example = torch.zeros(F.size, dtype=torch.float64)
    batch_mean_sq = torch.zeros(F.size, dtype=torch.float64)
    for xb, yb in batches:
        for i in range(len(xb)):  # per-example squared gradients, by brute force
            model.zero_grad()
            nn.functional.cross_entropy(model(xb[i : i + 1]), yb[i : i + 1]).backward()
            per_example += _flat_grad(model) ** 2
        model.zero_grad()  # Avalanche: square of the batch-mean gradient
        nn.functional.cross_entropy(model(xb), yb).backward()
        batch_mean_sq += _flat_grad(model) ** 2
    torch.testing.assert_close(F.diagonal(), per_example, rtol=1e-10, atol=1e-12)
    avalanche = batch_mean_sq / len(batches)  # their per-observation Fisher
    ratio = float(F.mean().diagonal().sum() / avalanche.sum())
    assert B / 2 < ratio < 2 * B, ratio


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def test_bad_input_is_a_clear_error():
    model = _model()
    F = _fisher(model, "kfac")
    with pytest.raises(ValueError, match=r"lacks parameters.*'0.weight'"):
        ff.apps.EWC(F, {"other": torch.zeros(1)})
    wrong = dict(model.state_dict())
    wrong["0.weight"] = torch.zeros(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'0.weight'.*shape \(5, 3\).*\(4, 3\)"):
        ff.apps.EWC(F, wrong)
    ewc = ff.apps.EWC(F, model)
    with pytest.raises(ValueError, match="shape"):
        ewc.penalty(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.LayerNorm(2)))
    with pytest.raises(ValueError, match=r"length|shape \(\d+,\)"):
        ewc.penalty(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="decay must be in"):
        ewc.consolidate(F, model, decay=0.0)
    with pytest.raises(ValueError, match="structure"):
        ewc.consolidate(_fisher(model, "diagonal"), model)
    with pytest.raises(ValueError, match="strength"):
        ff.apps.EWC(F, model, strength=-1.0)
    with pytest.raises(ValueError, match=r"anchor_rule must be one of \['fused', 'latest'\]"):
        ff.apps.EWC(F, model, anchor_rule="mean")
    nan = {k: v.clone() for k, v in model.state_dict().items()}
    nan["0.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ff.apps.EWC(F, nan)


def test_kfac_fast_path_on_a_gpt2_equals_the_dense_formula():
    """Batched same-shape layers, input-major Conv1D, 1-D embedding factors, LayerNorm."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=12, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(0))
    F = ff.estimate(model, [{"input_ids": ids, "labels": ids}], "categorical", "empirical", "kfac",
                    progress=False)  # fmt: skip
    assert any(f.dim() == 1 for f in F.A.values())  # the embedding's one-hot input factor
    anchor = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    ewc = ff.apps.EWC(F, anchor, strength=0.7)
    pen = ewc.penalty(model)
    assert ewc._quadratic is not None and len(ewc._quadratic.buckets) < len(F.kron_groups)
    model.zero_grad()
    pen.backward()
    theta = F.layout.flatten(dict(model.named_parameters()))
    delta = (theta - F.layout.flatten(anchor)).detach()
    D = F.to_dense()
    torch.testing.assert_close(pen.detach(), 0.35 * delta @ D @ delta, rtol=1e-11, atol=1e-13)
    params = dict(model.named_parameters())
    grad = F.layout.flatten({n: params[n].grad for n in F.layout.names})
    torch.testing.assert_close(grad, 0.7 * D @ delta, rtol=1e-11, atol=1e-13)
    # the flat-tensor path agrees, and consolidating rebuilds the cached kernel
    torch.testing.assert_close(ewc.penalty(theta.detach()), pen.detach(), rtol=1e-12, atol=0)
    ewc.consolidate(F, anchor)  # the same task again: F + F = 2F, same anchor
    assert ewc._quadratic is None
    torch.testing.assert_close(ewc.penalty(model), 2 * pen.detach(), rtol=1e-12, atol=0)
