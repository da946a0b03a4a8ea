"""The ``torch.optim.Optimizer`` contract, one table run for every fisherflow optimizer.

Param groups, a ``state_dict`` round trip through ``torch.load(weights_only=True)``
that continues bit-identically, closures, LR schedulers, a non-finite gradient
skipped (or raised), hyperparameters named in their errors, ``step()`` before any
backward. Each case trains a tiny float64 MLP on a fixed batch.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from fisherflow import optim


@dataclass(frozen=True)
class Spec:
    """One optimizer of the table: how to build it and what it promises."""

    build: Callable[..., torch.optim.Optimizer]
    base: dict[str, Any]  # hyperparameters for the cases
    bad: list[tuple[str, object]]  # (argument, bad value) pairs the constructor rejects
    group_override: tuple[str, Any]  # a per-group hyperparameter and a non-default value
    state_key: str  # the optimizer-wide entry of its state dict
    fisher: tuple[str, str, float]  # structure, kind, num_samples after 4 steps (batch 16)


def _named(cls: Callable[..., Any], **fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def build(m: nn.Module, params: Any = None, **kw: Any) -> torch.optim.Optimizer:
        return cls(m.parameters() if params is None else params, model=m, **{**fixed, **kw})

    return build


#: Hyperparameters for the cases: curvature refreshed every other step, momentum on.
BASE = {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.01, "update_freq": 2, "damping": 0.1}
NATURAL_BAD: list[tuple[str, object]] = [
    ("lr", -1.0),
    ("momentum", -0.5),
    ("weight_decay", -0.1),
    ("update_freq", 0),
    ("inverse_freq", 0),
    ("ema", 1.0),
    ("kl_clip", 0.0),
    ("damping", -1e-3),
    ("kind", "fisher"),
    ("likelihood", "cauchy"),
    ("loss_reduction", "avg"),
    ("nonfinite", "ignore"),
    ("seed", -1),
    ("curvature_rows", 0),
]
FACTORED_BASE = {"lr": 0.05, "weight_decay": 0.01, "precondition_frequency": 2}
FACTORED_BAD: list[tuple[str, object]] = [
    ("lr", -1.0),
    ("weight_decay", -0.1),
    ("eps", 0.0),
    ("betas", (1.0, 0.9)),
    ("betas", 0.9),
    ("precondition_frequency", 0),
    ("max_precond_dim", 0),
    ("nonfinite", "ignore"),
]
SHAMPOO_BAD = [*FACTORED_BAD, ("exponent", 0.5), ("graft", "adagrad")]
SOAP_BAD = [
    *FACTORED_BAD,
    ("shampoo_beta", 1.0),
    ("basis", "muon"),
    ("seed", -1),
    ("curvature_rows", 0),
]


def _natural(structure: str) -> Spec:
    return Spec(
        lambda m, **kw: optim.NaturalGradient(m, structure=structure, **kw),
        BASE,
        NATURAL_BAD,
        ("momentum", 0.9),
        "natural_gradient",
        (structure, "mc", 16),
    )


#: Every optimizer fisherflow provides.
OPTIMIZERS: dict[str, Spec] = {
    "natural-diagonal": _natural("diagonal"),
    "natural-dense": _natural("dense"),
    "natural-block": _natural("block"),
    "kfac": Spec(
        lambda m, **kw: optim.KFAC(m, **kw),
        BASE,
        NATURAL_BAD,
        ("momentum", 0.9),
        "natural_gradient",
        ("kfac", "mc", 16),
    ),
    "kfac-power": Spec(
        lambda m, **kw: optim.KFAC(m, **{"eigen_refresh": "power", **kw}),
        BASE,
        [*NATURAL_BAD, ("eigen_refresh", "qr")],
        ("momentum", 0.9),
        "natural_gradient",
        ("kfac", "mc", 16),
    ),
    "ekfac": Spec(
        lambda m, **kw: optim.EKFAC(m, **kw),
        BASE,
        NATURAL_BAD,
        ("momentum", 0.9),
        "natural_gradient",
        ("ekfac", "mc", 16),
    ),
    "shampoo": Spec(
        _named(optim.Shampoo),
        FACTORED_BASE,
        SHAMPOO_BAD,
        ("betas", (0.5, 0.5)),
        "shampoo",
        ("kfac", "empirical", 16),
    ),
    "shampoo-half": Spec(
        _named(optim.Shampoo, exponent=-0.5, graft="sgd"),
        FACTORED_BASE,
        SHAMPOO_BAD,
        ("betas", (0.5, 0.5)),
        "shampoo",
        ("kfac", "empirical", 16),
    ),
    "shampoo-power": Spec(
        lambda m, params=None, **kw: optim.Shampoo(
            m.parameters() if params is None else params,
            model=m,
            **{"eigen_refresh": "power", **kw},
        ),
        FACTORED_BASE,
        [*SHAMPOO_BAD, ("eigen_refresh", "qr")],
        ("betas", (0.5, 0.5)),
        "shampoo",
        ("kfac", "empirical", 16),
    ),
    "soap": Spec(
        _named(optim.SOAP),
        FACTORED_BASE,
        SOAP_BAD,
        ("betas", (0.5, 0.5)),
        "soap",
        ("ekfac", "empirical", 16),
    ),
    "soap-kfac": Spec(
        _named(optim.SOAP, basis="kfac"),
        FACTORED_BASE,
        [*SOAP_BAD, ("kind", "empirical")],
        ("betas", (0.5, 0.5)),
        "soap",
        ("kfac", "mc", 16),
    ),
}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (16,), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for s in steps:
        x, y = batch(s)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=sorted(OPTIMIZERS))
def spec(request: Any) -> Spec:
    return OPTIMIZERS[request.param]


def test_trains_and_hands_back_the_fisher(spec: Spec) -> None:
    model = make_model()
    opt = spec.build(model, **spec.base)
    losses = train(model, opt, range(4))
    fisher = opt.fisher() if spec.state_key == "natural_gradient" else opt.fisher(batch_size=16)
    structure, kind, num_samples = spec.fisher
    assert (fisher.structure, fisher.kind) == (structure, kind)
    assert fisher.likelihood == ("categorical" if kind == "mc" else None)
    assert fisher.num_samples == num_samples
    assert fisher.layout.names == tuple(n for n, _ in model.named_parameters())
    assert opt.steps == 4 and opt.skipped == 0
    assert all(torch.isfinite(torch.tensor(losses)))


def test_param_groups_have_their_own_hyperparameters(spec: Spec) -> None:
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    key, value = spec.group_override
    groups = [{"params": first, "lr": 0.2}, {"params": second, "lr": 0.0, key: value}]
    opt = spec.build(model, **{**spec.base, "params": groups})
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.0]
    assert [g[key] for g in opt.param_groups] == [opt.defaults[key], value]
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, range(2))  # SOAP's first step only builds its basis
    after = list(model.parameters())
    assert not torch.equal(before[0], after[0])  # lr 0.2 moves the first layer
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])  # lr 0


@pytest.mark.parametrize("extra", [{}, "refresh"], ids=["default", "refresh"])
def test_state_dict_round_trip_continues_bit_identically(spec: Spec, extra: Any) -> None:
    if extra == "refresh":  # a preconditioner kept between refreshes
        extra = (
            {"update_freq": 1, "inverse_freq": 3}
            if "update_freq" in spec.base
            else {"precondition_frequency": 3}
        )
    hyper = {**spec.base, **extra}
    model = make_model()
    opt = spec.build(model, **hyper)
    train(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed = spec.build(resumed_model, **hyper)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(model, opt, range(3, 7))
    train(resumed_model, resumed, range(3, 7))
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.steps == opt.steps == 7


def test_load_state_dict_rejects_a_foreign_state(spec: Spec) -> None:
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=spec.state_key):
        spec.build(model, **spec.base).load_state_dict(sgd.state_dict())


def test_closure_returns_the_loss_and_steps_as_backward_does(spec: Spec) -> None:
    model, twin = make_model(), make_model()
    opt, twin_opt = spec.build(model, **spec.base), spec.build(twin, **spec.base)
    for s in range(2):
        x, y = batch(s)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        twin_loss = train(twin, twin_opt, range(s, s + 1))[0]
        assert loss.item() == twin_loss
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_learning_rate(spec: Spec) -> None:
    model = make_model()
    opt = spec.build(model, **spec.base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for s in range(3):
        train(model, opt, range(s, s + 1))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(spec.base["lr"] * 0.5**3)
    opt.param_groups[0]["lr"] = 0.0  # a zero rate, set by hand, freezes the model
    opt.param_groups[0]["weight_decay"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, range(3, 4))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_nan_gradient_is_skipped_with_a_warning(spec: Spec) -> None:
    model = make_model()
    opt = spec.build(model, **spec.base)
    train(model, opt, range(2))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(2)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient") as record:
        opt.step()
    assert record[0].filename == __file__  # attributed to the user's line
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    assert opt.steps == 2 and opt.skipped == 1
    train(model, opt, range(2, 3))  # the next good step goes through
    assert opt.steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_gradient_raises_on_request(spec: Spec) -> None:
    model = make_model()
    opt = spec.build(model, **{**spec.base, "nonfinite": "raise"})
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="gradient"):
        opt.step()


def test_step_before_backward_is_a_clear_error(spec: Spec) -> None:
    model = make_model()
    opt = spec.build(model, **spec.base)
    with pytest.raises(RuntimeError, match=r"loss\.backward\(\)"):
        opt.step()


def test_bad_hyperparameters_are_named(spec: Spec) -> None:
    for name, value in spec.bad:
        with pytest.raises(ValueError, match=name.split("[")[0]):
            spec.build(make_model(), **{**spec.base, name: value})


def test_bad_group_hyperparameter_is_named(spec: Spec) -> None:
    model = make_model()
    groups = [{"params": list(model.parameters()), "lr": -1.0}]
    with pytest.raises(ValueError, match="lr"):
        spec.build(model, **{**spec.base, "params": groups})
