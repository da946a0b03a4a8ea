"""Every kind × structure against the dense brute-force reference (float64)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from cases import CASES, make_case
from torch import nn

from fisherflow.estimation import FallbackNotice, estimate, reference_fisher

KINDS = ["exact", "mc", "empirical"]
FAST = {"mlp", "cnn", "conv1d", "twice", "tied"}


@functools.cache
def _ref(case: str, kind: str) -> torch.Tensor:
    model, data, lik = make_case(case)
    return reference_fisher(model, data, lik, kind, seed=3, mc_samples=2)


def _est(case: str, kind: str, structure: str, **kw):
    model, data, lik = make_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackNotice)
        return estimate(
            model, data, lik, kind, structure, seed=3, mc_samples=2, progress=False, **kw
        )


def _block_part(F, R):
    M = torch.zeros_like(R)
    for names in F.groups().values():
        idx = F.layout.indices(names)
        M[idx[:, None], idx] = R[idx[:, None], idx]
    return M


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_dense_diagonal_block_match_reference(case, kind):
    if kind == "exact" and case not in FAST:
        pytest.skip("exact sequences: diagonal only, in test_exact_sequences_diagonal")
    R = _ref(case, kind)
    D = _est(case, kind, "dense").to_dense()
    torch.testing.assert_close(D, R, rtol=1e-9, atol=1e-11)
    d = _est(case, kind, "diagonal").diagonal()
    torch.testing.assert_close(d, R.diagonal(), rtol=1e-9, atol=1e-11)
    B = _est(case, kind, "block")
    torch.testing.assert_close(B.to_dense(), _block_part(B, R), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", ["transformer", "gpt2"])
def test_exact_sequences_diagonal(case):
    R = _ref(case, "exact")
    d = _est(case, "exact", "diagonal").diagonal()
    torch.testing.assert_close(d, R.diagonal(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", ["mlp", "cnn", "tied", "twice"])
def test_lowrank_full_rank_matches_reference(case):
    R = _ref(case, "empirical")
    F = _est(case, "empirical", "lowrank", rank=R.shape[0])
    torch.testing.assert_close(F.to_dense(), R, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["mlp", "cnn", "conv1d", "tied", "twice"])
def test_ekfac_never_farther_than_kfac(case):
    R = _ref(case, "exact")
    K = _est(case, "exact", "kfac").to_dense()
    E = _est(case, "exact", "ekfac").to_dense()
    assert (E - R).norm() <= (K - R).norm() * (1 + 1e-10)


def test_kfac_exact_on_deep_linear_one_sample_per_row():
    model, data, lik = make_case("deeplinear")
    for batch in data:
        R = reference_fisher(model, [batch], lik, "exact")
        F = estimate(model, [batch], lik, "exact", "kfac", progress=False)
        blocks = _block_part(F, R)
        torch.testing.assert_close(F.to_dense(), blocks, rtol=1e-9, atol=1e-12)


def test_mc_converges_to_exact():
    model, data, lik = make_case("mlp")
    R = _ref("mlp", "exact")
    errs = []
    for m in (1, 16, 256):
        F = estimate(model, data, lik, "mc", "dense", mc_samples=m, seed=0, progress=False)
        errs.append(float((F.to_dense() - R).norm() / R.norm()))
    assert errs[-1] < 0.1 and errs[-1] < errs[0]


def test_empirical_is_not_square_of_batch_mean():
    model, data, lik = make_case("mlp")
    x, y = data[0]
    F = estimate(model, [(x, y)], lik, "empirical", "diagonal", progress=False).diagonal()
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    assert not torch.allclose(F, g * g)
    assert torch.all(F >= g * g / x.shape[0] - 1e-12)


def test_params_subset_and_metadata():
    model, data, lik = make_case("mlp")
    F = estimate(model, data, lik, "exact", "diagonal", params=["2.weight"], progress=False)
    R = _ref("mlp", "exact")
    assert F.layout.names == ("2.weight",)
    torch.testing.assert_close(F.diagonal(), R.diagonal()[24 + 6 : 24 + 6 + 18])
    assert F.kind == "exact" and F.likelihood == "categorical" and F.num_samples == 6


def test_masked_tokens_not_counted():
    F = _est("transformer", "empirical", "diagonal")
    assert F.num_samples == 4 * 5 - 2


def test_fallback_notice_names_module():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(2, 3), Scale()).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    with pytest.warns(FallbackNotice, match="'1'"):
        F = estimate(model, [(x, y)], "categorical", "empirical", "dense", progress=False)
    R = reference_fisher(model, [(x, y)], "categorical", "empirical")
    torch.testing.assert_close(F.to_dense(), R)


@pytest.mark.filterwarnings(
    "ignore::fisherflow.estimation.data.DataNotice"
)  # (ids, ids) on purpose
def test_functional_reuse_is_detected():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)

        def forward(self, ids):
            return self.emb(ids) @ self.emb.weight.T

    model = Tied().double()
    ids = torch.randint(0, 5, (3, 4))
    with pytest.warns(FallbackNotice, match="emb"):
        F = estimate(model, [(ids, ids)], "categorical", "empirical", "diagonal", progress=False)
    R = reference_fisher(model, [(ids, ids)], "categorical", "empirical")
    torch.testing.assert_close(F.diagonal(), R.diagonal())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "fisher"}, "kind must be one of"),
        ({"structure": "full"}, "structure must be one of"),
        ({"likelihood": "laplace"}, "likelihood must be one of"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"convention": "sum"}, "convention"),
    ],
)
def test_validation(kwargs, match):
    model, data, _ = make_case("mlp")
    with pytest.raises(ValueError, match=match):
        estimate(
            model, data, **{"likelihood": "categorical", "kind": "mc", **kwargs}, progress=False
        )


def test_likelihood_and_kind_are_always_named():
    model, data, _ = make_case("mlp")
    with pytest.raises(TypeError, match="likelihood.*kind|kind"):
        estimate(model, data, structure="diagonal", progress=False)
    with pytest.raises(TypeError, match="kind"):
        reference_fisher(model, data, likelihood="categorical")


def test_empty_data_and_one_shot_ekfac():
    model, data, _ = make_case("mlp")
    with pytest.raises(ValueError, match="empty"):
        estimate(model, [], "categorical", "mc", progress=False)
    with pytest.raises(ValueError, match="re-iterable"):
        estimate(model, iter(data), "categorical", "mc", structure="ekfac", progress=False)


def test_float32_and_bfloat16_models_accumulate_in_float32():
    model, data, lik = make_case("mlp")
    ref = _est("mlp", "empirical", "diagonal").diagonal()
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        d = [(x.to(dtype), y) for x, y in data]
        F = estimate(m, d, lik, "empirical", "diagonal", progress=False)
        assert F.dtype == torch.float32
        tol = 1e-4 if dtype == torch.float32 else 0.1
        assert float((F.diagonal().double() - ref).norm() / ref.norm()) < tol


def test_each_submodule_keeps_its_own_training_mode():
    model, data, _ = make_case("mlp")
    model.train()
    first = next(iter(model.children()))
    first.eval()  # e.g. a frozen part of a model being fine-tuned
    before = {name: m.training for name, m in model.named_modules()}
    estimate(model, data, "categorical", "mc", progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before
