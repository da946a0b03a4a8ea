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
from typing import Any

import pytest
import torch
from torch import nn

from fisherflow import optim

#: Every optimizer fisherflow provides, as ``factory(model, **hyperparameters)``.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "natural-diagonal": lambda m, **kw: optim.NaturalGradient(m, structure="diagonal", **kw),
    "natural-dense": lambda m, **kw: optim.NaturalGradient(m, structure="dense", **kw),
    "natural-block": lambda m, **kw: optim.NaturalGradient(m, structure="block", **kw),
    "kfac": lambda m, **kw: optim.KFAC(m, **kw),
    "ekfac": lambda m, **kw: optim.EKFAC(m, **kw),
}

#: Hyperparameters for the cases: curvature refreshed every other step, momentum on.
BASE = {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.01, "update_freq": 2, "damping": 0.1}


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
def factory(request: Any) -> Callable[..., torch.optim.Optimizer]:
    return OPTIMIZERS[request.param]


def test_trains_and_hands_back_the_fisher(factory: Callable[..., Any]) -> None:
    model = make_model()
    opt = factory(model, **BASE)
    train(model, opt, range(4))
    fisher = opt.fisher()
    assert fisher.kind == "mc" and fisher.likelihood == "categorical"
    assert fisher.structure == opt.structure
    assert fisher.num_samples == 16  # every update saw 16 observations
    assert opt.steps == 4 and opt.skipped == 0


def test_param_groups_have_their_own_hyperparameters(factory: Callable[..., Any]) -> None:
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    groups = [{"params": first, "lr": 0.2}, {"params": second, "lr": 0.0, "momentum": 0.9}]
    opt = factory(model, **{**BASE, "params": groups})
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.0]
    assert [g["momentum"] for g in opt.param_groups] == [0.5, 0.9]
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, range(1))
    after = list(model.parameters())
    assert not torch.equal(before[0], after[0])  # lr 0.2 moves the first layer
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])  # lr 0


@pytest.mark.parametrize(
    "extra", [{}, {"update_freq": 1, "inverse_freq": 3}], ids=["default", "inverse_freq"]
)
def test_state_dict_round_trip_continues_bit_identically(
    factory: Callable[..., Any], extra: dict[str, Any]
) -> None:
    hyper = {**BASE, **extra}
    model = make_model()
    opt = factory(model, **hyper)
    train(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed = factory(resumed_model, **hyper)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(model, opt, range(3, 7))
    train(resumed_model, resumed, range(3, 7))
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.steps == opt.steps == 7


def test_load_state_dict_rejects_a_foreign_state(factory: Callable[..., Any]) -> None:
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="natural_gradient"):
        factory(model, **BASE).load_state_dict(sgd.state_dict())


def test_closure_returns_the_loss_and_steps_as_backward_does(factory: Callable[..., Any]) -> None:
    x, y = batch(0)
    model, twin = make_model(), make_model()
    opt, twin_opt = factory(model, **BASE), factory(twin, **BASE)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    twin_loss = train(twin, twin_opt, range(1))[0]
    assert loss.item() == twin_loss
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_learning_rate(factory: Callable[..., Any]) -> None:
    model = make_model()
    opt = factory(model, **BASE)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for s in range(3):
        train(model, opt, range(s, s + 1))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    opt.param_groups[0]["lr"] = 0.0  # a zero rate, set by hand, freezes the model
    opt.param_groups[0]["weight_decay"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, range(3, 4))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_nan_gradient_is_skipped_with_a_warning(factory: Callable[..., Any]) -> None:
    model = make_model()
    opt = factory(model, **BASE)
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


def test_nan_gradient_raises_on_request(factory: Callable[..., Any]) -> None:
    model = make_model()
    opt = factory(model, **{**BASE, "nonfinite": "raise"})
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="gradient"):
        opt.step()


def test_step_before_backward_is_a_clear_error(factory: Callable[..., Any]) -> None:
    model = make_model()
    opt = factory(model, **BASE)
    with pytest.raises(RuntimeError, match=r"loss\.backward\(\)"):
        opt.step()


BAD = [
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
]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_hyperparameters_are_named(
    factory: Callable[..., Any], name: str, value: object
) -> None:
    with pytest.raises(ValueError, match=name):
        factory(make_model(), **{**BASE, name: value})


def test_bad_group_hyperparameter_is_named(factory: Callable[..., Any]) -> None:
    model = make_model()
    groups = [{"params": list(model.parameters()), "momentum": -1.0}]
    with pytest.raises(ValueError, match="momentum"):
        factory(model, **{**BASE, "params": groups})
