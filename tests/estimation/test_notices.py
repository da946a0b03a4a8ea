"""Notices point at the user's line, whichever entry point issued them."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import fisherflow as ff
from fisherflow.estimation import DataNotice, FallbackNotice


class _Scaled(nn.Module):
    """A parameterised module no hook captures (it falls back, with a notice)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lin(x)
        return out, out.detach()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))] * 2


def _caught(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, FallbackNotice | DataNotice)]


def test_fallback_notice_points_at_the_callers_line_from_every_entry_point():
    model = nn.Sequential(_Scaled(), nn.Linear(3, 2)).double()
    data = _data()

    def from_estimate():
        ff.estimate(model, data, "categorical", "empirical", progress=False)

    def from_update():
        est = ff.FisherEstimator(model, "categorical", "empirical")
        for batch in data:
            est.update(batch)

    def from_update_from():
        est = ff.FisherEstimator(model, "categorical", "empirical")
        with est.update_from(data[0]) as record:
            record(model(data[0][0]))

    for fn in (from_estimate, from_update, from_update_from):
        notes = _caught(fn)
        assert len(notes) == 1, [str(n.message) for n in notes]
        assert notes[0].filename == __file__, (fn.__name__, notes[0].filename)


def test_data_notice_once_per_estimate_at_the_callers_line():
    model, data = _Pair(), _data()
    notes = _caught(lambda: ff.estimate(model, data, "categorical", "empirical", progress=False))
    assert len(notes) == 1 and issubclass(notes[0].category, DataNotice)
    assert "first" in str(notes[0].message)
    assert notes[0].filename == __file__
