"""The exact kind costs what its arithmetic needs: one backward per class where it can.

Position-local layers (nothing after them mixes positions) take ``C`` backward passes
per batch with each (row, position) as its own row; layers before attention keep one
per (position, class). Checked in float64 against ``reference_fisher`` and against
the per-(position, class) path, with the passes counted.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import TinyTransformer
from torch import nn

import fisherflow as ff
from fisherflow.estimation import engine, positions
from fisherflow.estimation.hookcheck import clear_probe_cache

V, T = 5, 6


class EmbedMLP(nn.Module):
    """Embedding → MLP (with a LayerNorm) → logits, every layer position-local."""

    def __init__(self, vocab: int = V, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(h + self.mlp(self.ln(h)))


class Bigram(nn.Module):
    """An embedding whose rows are the next token's logits."""

    def __init__(self, vocab: int = V) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


class Tail(nn.Module):
    """A causal transformer block whose MLP head after attention is position-local."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyTransformer(vocab=V, seq=T)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(ids)


def _case(name: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = {"mlp": EmbedMLP, "bigram": Bigram, "transformer": Tail}[name]().double().eval()
    ids = torch.randint(0, V, (4, T), generator=g)
    labels = torch.randint(0, V, (4, T), generator=g)
    labels[1, :2] = -100  # masked positions take no pass and add nothing
    return model, [(ids[:2], labels[:2]), (ids[2:], labels[2:])]


def _old_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_split_local", lambda *a, **k: None)


class _Counter:
    """Counts backward passes: cotangents given to ``torch.autograd.grad``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes = 0
        grad = torch.autograd.grad

        def counted(outputs, inputs, grad_outputs=None, **kw):
            if grad_outputs is not None:
                g = grad_outputs if torch.is_tensor(grad_outputs) else grad_outputs[0]
                self.passes += g.shape[0] if kw.get("is_grads_batched") else 1
            return grad(outputs, inputs, grad_outputs, **kw)

        monkeypatch.setattr(torch.autograd, "grad", counted)


@pytest.mark.parametrize("name", ["mlp", "bigram", "transformer"])
@pytest.mark.parametrize("structure", ["diagonal", "dense"])
def test_exact_equals_reference(name, structure):
    model, data = _case(name)
    ref = ff.reference_fisher(model, data, "categorical", "exact")
    F = ff.estimate(model, data, "categorical", "exact", structure)
    if structure == "diagonal":
        torch.testing.assert_close(F.to_dense().diagonal(), ref.diagonal(), rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(F.to_dense(), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", "bigram", "transformer"])
@pytest.mark.parametrize(
    ("structure", "convention"),
    [
        ("kfac", "expand"),
        ("kfac", "reduce"),
        ("ekfac", "expand"),
        ("ekfac", "reduce"),
        ("block", "expand"),
    ],
)
def test_same_as_per_position_path(name, structure, convention, monkeypatch):
    model, data = _case(name)
    new = ff.estimate(model, data, "categorical", "exact", structure, convention=convention)
    _old_path(monkeypatch)
    old = ff.estimate(model, data, "categorical", "exact", structure, convention=convention)
    torch.testing.assert_close(new.to_dense(), old.to_dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", "bigram"])
def test_one_backward_per_class_when_every_layer_is_local(name, monkeypatch):
    model, data = _case(name)
    ff.estimate(model, data, "categorical", "exact", "diagonal")  # probes cached
    count = _Counter(monkeypatch)
    ff.estimate(model, data, "categorical", "exact", "kfac")
    assert count.passes == V * len(data)
    _old_path(monkeypatch)
    count.passes = 0
    ff.estimate(model, data, "categorical", "exact", "kfac")
    alive = sum(int((y != -100).any(0).sum()) for _, y in data)
    assert count.passes == V * alive


def test_layers_before_attention_keep_their_price(monkeypatch):
    model, data = _case("transformer")
    ff.estimate(model, data, "categorical", "exact", "diagonal")
    count = _Counter(monkeypatch)
    ff.estimate(model, data, "categorical", "exact", "diagonal")
    alive = sum(int((y != -100).any(0).sum()) for _, y in data)
    assert count.passes == V * len(data) + V * alive  # the head's class passes, then (t, j)
    count.passes = 0
    ff.estimate(model, data, "categorical", "exact", "dense")  # whole matrix: (t, j) only
    assert count.passes == V * alive


def test_locality_probe():
    model, data = _case("transformer")
    clear_probe_cache()
    est = ff.FisherEstimator(model, "categorical", "exact", "diagonal")
    est.update(data[0])
    ((found,),) = (c.values() for c in positions._LOCAL.values())
    after = {"attn.out_proj", "ln2", "mlp.0", "mlp.2", "head"}  # after the attention
    assert found == {f"body.{m}.weight" for m in after}
    clear_probe_cache()
    assert not positions._LOCAL
    assert positions.probe_positions(6) == [0, 3, 5]
    assert positions.probe_positions(2) == [0, 1]


def test_tied_head_follows_the_embedding():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=V, seq=T, tie=True).double().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g))]
    ref = ff.reference_fisher(model, data, "categorical", "exact")
    F = ff.estimate(model, data, "categorical", "exact", "diagonal")
    torch.testing.assert_close(F.to_dense().diagonal(), ref.diagonal(), rtol=1e-12, atol=1e-14)


def test_lowrank_keeps_the_per_position_path(monkeypatch):
    model, data = _case("mlp")
    new = ff.estimate(model, data, "categorical", "exact", "lowrank", rank=4)
    _old_path(monkeypatch)
    old = ff.estimate(model, data, "categorical", "exact", "lowrank", rank=4)
    assert torch.equal(new.to_dense(), old.to_dense())


def test_long_run_notice(monkeypatch):
    model, data = _case("transformer")
    monkeypatch.setattr(positions, "LONG_PASSES", 10)
    monkeypatch.setattr(positions, "LONG_SECONDS", 0.0)
    with pytest.warns(positions.CostNotice, match="backward passes on the first batch") as got:
        ff.estimate(model, data, "categorical", "exact", "diagonal")
    assert len(got) == 1  # once per estimate
    assert "position-local" in str(got[0].message)
    assert "needs" in str(got[0].message)  # announced before the batch's passes ran
    assert got[0].filename == __file__  # at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.estimate(model, data, "categorical", "mc", "diagonal")  # only the exact kind


def test_long_run_notice_comes_before_the_rest_of_the_passes(monkeypatch):
    """The notice is issued after the first chunk of passes, with the others still to run."""
    model, data = _case("transformer")
    monkeypatch.setattr(positions, "LONG_PASSES", 10)
    monkeypatch.setattr(positions, "LONG_SECONDS", 0.0)
    ticks: list[int] = []
    real = positions.CostTimer.tick

    def tick(self, passes):
        ticks.append(passes)
        if not self.pending:
            return
        real(self, passes)
        if not self.pending:
            ticks.append(-1)  # the notice was issued here

    monkeypatch.setattr(positions.CostTimer, "tick", tick)
    with pytest.warns(positions.CostNotice, match="needs"):
        ff.estimate(model, data[:1], "categorical", "exact", "diagonal")
    at = ticks.index(-1)
    assert 0 < at < len(ticks) - 1  # after the first chunk, before the last


class Scaled(EmbedMLP):
    """Position-local hooked layers and a bare parameter left to ``torch.func``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, V))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.scale


@pytest.mark.filterwarnings("ignore::fisherflow.estimation.FallbackNotice")
@pytest.mark.parametrize("structure", ["diagonal", "dense"])
def test_fallback_parameters_with_local_layers(structure, monkeypatch):
    torch.manual_seed(0)
    model = Scaled().double().eval()
    _, data = _case("mlp")
    ref = ff.reference_fisher(model, data, "categorical", "exact")
    splits = []
    split_local = engine._split_local

    def recorded(*args):
        splits.append(split_local(*args))
        return splits[-1]

    monkeypatch.setattr(engine, "_split_local", recorded)
    F = ff.estimate(model, data, "categorical", "exact", structure)
    got = F.to_dense()
    if structure == "diagonal":
        got, ref = got.diagonal(), ref.diagonal()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # per-layer sums take the hooked layers from the class passes; a whole matrix
    # with a fallback parameter keeps the (position, class) passes for everything
    assert all((s is not None) == (structure == "diagonal") for s in splits)
    assert splits
