"""Position embeddings looked up without the batch dimension and broadcast over it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from fisherflow.estimation import FallbackNotice, estimate, reference_fisher
from fisherflow.estimation.engine import clear_probe_cache


class PosNet(nn.Module):
    """Token + position embeddings; ``mode`` says how the positions are looked up."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.tok = nn.Embedding(6, 3)
        self.pos = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, ids: Tensor) -> Tensor:
        t = torch.arange(ids.shape[1])
        if self.mode == "flat":  # (T,) indices, (T, d) broadcast against (B, T, d)
            p = self.pos(t)
        elif self.mode == "lead":  # (1, T) indices as in GPT-2
            p = self.pos(t[None])
        elif self.mode == "total":  # depends on the batch size once expanded
            p = self.pos(t)
            p = p + 0.1 * p.sum()
        elif self.mode == "strict":  # the model checks the shape itself
            p = self.pos(t)
            if p.dim() != 2:
                raise ValueError("position embeddings must be (T, d)")
        else:  # a reduction over dimension 0 that expansion would change
            p = self.pos(t).mean(0)
        return self.head(torch.tanh(self.tok(ids) + p))


def _data() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (5, 4), generator=g)
    y = torch.randint(0, 4, (5, 4), generator=g)
    return [(ids[:3], y[:3]), (ids[3:], y[3:])]


@pytest.mark.parametrize("mode", ["flat", "lead"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_broadcast_position_embedding_is_captured(mode, kind):
    torch.manual_seed(1)
    model = PosNet(mode).double()
    data = _data()
    clear_probe_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackNotice)  # no per-sample fallback
        F = estimate(model, data, "categorical", kind, "dense", progress=False)
        D = estimate(model, data, "categorical", kind, "diagonal", progress=False)
    R = reference_fisher(model, data, "categorical", kind)
    torch.testing.assert_close(F.to_dense(), R)
    torch.testing.assert_close(D.diagonal(), R.diagonal())


def test_expansion_that_changes_the_output_falls_back():
    torch.manual_seed(2)
    model = PosNet("mean").double()
    data = _data()
    clear_probe_cache()
    with pytest.warns(FallbackNotice, match="'pos'"):
        F = estimate(model, data, "categorical", "empirical", "dense", progress=False)
    torch.testing.assert_close(
        F.to_dense(), reference_fisher(model, data, "categorical", "empirical")
    )


def _batches(sizes: list[int], t: int = 4) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(sum(sizes))
    return [
        (torch.randint(0, 6, (b, t), generator=g), torch.randint(0, 4, (b, t), generator=g))
        for b in sizes
    ]


@pytest.mark.parametrize(
    ("mode", "sizes"),
    [
        ("flat", [3, 4]),  # a later batch has as many rows as positions
        ("flat", [4, 3]),  # so does the checked (first) batch
        ("lead", [4, 1, 3]),
        ("total", [1, 3]),  # a one-row first batch cannot show the batch-size dependence
        ("total", [3, 2]),
        ("strict", [3, 2]),  # the model raises on the expanded output: fall back
        ("mean", [3, 4]),
    ],
)
def test_expansion_agrees_with_reference_whatever_the_batches(mode, sizes):
    torch.manual_seed(3)
    model = PosNet(mode).double()
    data = _batches(sizes)
    clear_probe_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackNotice)
        D = estimate(model, data, "categorical", "empirical", "diagonal", progress=False)
    R = reference_fisher(model, data, "categorical", "empirical")
    torch.testing.assert_close(D.diagonal(), R.diagonal())
