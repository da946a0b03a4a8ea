"""``ff.apps.prune_sequential``: block by block, each on the Fisher of the pruned model.

The first block's result is one-shot pruning's; every later block equals pruning it
with a Fisher estimated on the model whose earlier blocks are already pruned (and
differs from one-shot), in float64 on a small MLP.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fisherflow as ff

N = 64


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (N,), generator=g)
    return model, [(x[:32], y[:32]), (x[32:], y[32:])]


def _estimate(model, data, names):
    return ff.estimate(
        model, data, "categorical", "exact", "kfac", params=names, seed=0, progress=False
    )


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["obs", "wanda"])
def test_blocks_are_pruned_on_the_fisher_of_the_pruned_model(mlp, method):
    model, data = mlp
    kwargs = dict(method=method, scope="row", rel_damping=0.01 if method == "obs" else 0.0)
    blocks = ff.apps.blocks_of(model)
    assert blocks == [["0.weight"], ["2.weight"], ["4.weight"]]
    seq = copy.deepcopy(model)
    masks = ff.apps.prune_sequential(
        seq, data, 0.5, likelihood="categorical", kind="exact", progress=False, **kwargs
    )
    # by hand: block after block, each Fisher re-estimated on the model pruned so far
    manual = copy.deepcopy(model)
    for block in blocks:
        F = _estimate(manual, data, [*block, block[0].replace("weight", "bias")])
        m = ff.apps.prune(manual, F, 0.5, params=block, **kwargs)
        for n in block:
            assert torch.equal(m[n], masks[n])
    for n, p in _state(seq).items():
        torch.testing.assert_close(p, _state(manual)[n], rtol=0, atol=0)
    # one-shot: every block on the dense model's Fisher
    one = copy.deepcopy(model)
    F = _estimate(one, data, [n for n, _ in one.named_parameters()])
    ff.apps.prune(one, F, 0.5, **kwargs)
    torch.testing.assert_close(_state(seq)["0.weight"], _state(one)["0.weight"])
    torch.testing.assert_close(_state(seq)["0.bias"], _state(one)["0.bias"])
    later = _state(seq)["4.weight"] - _state(one)["4.weight"]
    assert float(later.abs().max()) > 1e-6  # the last block saw pruned inputs


def test_a_custom_estimate_is_called_per_block_in_order(mlp):
    model, data = mlp
    calls = []

    def estimate(m, names):
        calls.append(list(names))
        return _estimate(m, data, [n for n, _ in m.named_parameters() if n[0] in "24"])

    blocks = [["2.weight"], ["4.weight"]]
    masks = ff.apps.prune_sequential(
        model, None, None, pattern="2:4", blocks=blocks, estimate=estimate, rel_damping=0.01
    )
    assert calls == blocks
    assert sorted(masks) == ["2.weight", "4.weight"]
    for m in masks.values():
        assert bool((m.reshape(-1, 4).sum(1) == 2).all())


def test_bad_input_fails_with_named_errors(mlp):
    model, data = mlp
    with pytest.raises(ValueError, match="re-iterable"):
        ff.apps.prune_sequential(model, iter(data), 0.5, progress=False)
    with pytest.raises(ValueError, match="data: method 'obs'"):
        ff.apps.prune_sequential(model, None, 0.5, progress=False)
    with pytest.raises(ValueError, match="disjoint; repeated: \\['0.weight'\\]"):
        ff.apps.prune_sequential(model, data, 0.5, blocks=[["0.weight"], ["0.weight"]])
    with pytest.raises(ValueError, match="unknown: \\['nope'\\]"):
        ff.apps.prune_sequential(model, data, 0.5, blocks=[["nope"]])
    with pytest.raises(ValueError, match="non-empty lists"):
        ff.apps.prune_sequential(model, data, 0.5, blocks=[[]])
    with pytest.raises(ValueError, match="method must be one of"):
        ff.apps.prune_sequential(model, data, 0.5, method="random")
    with pytest.raises(TypeError, match="estimate must be callable"):
        ff.apps.prune_sequential(model, data, 0.5, estimate=3)  # type: ignore[arg-type]
    for bad in ({"sparsity": 1.5}, {"sparsity": 0.3, "pattern": "2:4"}, {"scope": "rows"}):
        kwargs = {"sparsity": 0.5, **bad}
        with pytest.raises(ValueError, match="sparsity|pattern|scope"):
            ff.apps.prune_sequential(model, iter(data), estimate=None, **kwargs)
