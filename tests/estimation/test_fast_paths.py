"""Fast paths of ``estimate``: batched backward for many scores, cached hook check."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fisherflow.estimation import FallbackNotice, engine, estimate, reference_fisher


def _mlp() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    return model, [(x, y), (x[:3] * 2, y[:3])]


@pytest.mark.parametrize(
    "budget", [(1, 1e9), (40, 1e9), (engine.BATCH_ELEMENTS, 1e9), (engine.BATCH_ELEMENTS, 0.0)]
)
@pytest.mark.parametrize("structure", ["diagonal", "dense", "kfac"])
def test_batched_exact_matches_reference(monkeypatch, budget, structure):
    """Chunks of 1, a few, or all scores give the same (exact) result."""
    monkeypatch.setattr(engine, "BATCH_ELEMENTS", budget[0])
    monkeypatch.setattr(engine, "BATCH_MEMORY", budget[1])
    monkeypatch.setattr(engine, "BATCH_MIN_BYTES", 0)
    model, data = _mlp()
    F = estimate(model, data, "categorical", "exact", structure, progress=False)
    R = reference_fisher(model, data, "categorical", "exact")
    if structure == "diagonal":
        torch.testing.assert_close(F.diagonal(), R.diagonal())
    elif structure == "dense":
        torch.testing.assert_close(F.to_dense(), R)
    else:
        # last layer: G is the summed output Fisher Σ_n (diag p − p pᵀ), A the mean a aᵀ
        x = torch.cat([d[0] for d in data])
        p = torch.softmax(model(x), -1).detach()
        G = torch.diag(p.sum(0)) - p.T @ p
        torch.testing.assert_close(F.G["3"], G)  # type: ignore[attr-defined]
        torch.testing.assert_close(F.rest, R.diagonal()[F.layout.indices(["2.weight", "2.bias"])])  # type: ignore[attr-defined]


def test_chunks_follow_the_memory_budget(monkeypatch):
    """``k`` scores per backward: their output gradients within BATCH_MEMORY × the records."""
    from fisherflow.estimation.layers import Record

    monkeypatch.setattr(engine, "BATCH_MIN_BYTES", 0)
    rec = Record(None, torch.zeros(1), None, torch.zeros(8, 30), torch.zeros(8, 10))
    # held: 8·(30 + 10) entries; one score's output gradients: 8·10 entries
    assert engine.chunk_scores([rec], 10) == max(1, int(engine.BATCH_MEMORY * 4))
    monkeypatch.setattr(engine, "BATCH_MEMORY", 1.0)
    assert engine.chunk_scores([rec], 10) == 4
    assert engine.chunk_scores([rec], 3) == 3
    monkeypatch.setattr(engine, "BATCH_MEMORY", 0.0)
    assert engine.chunk_scores([rec], 10) == 1
    monkeypatch.setattr(engine, "BATCH_MEMORY", 1e9)
    monkeypatch.setattr(engine, "BATCH_ELEMENTS", 3 * 80)
    assert engine.chunk_scores([rec], 10) == 3
    # whatever BATCH_MEMORY allows, BATCH_MIN_BYTES of output gradients are allowed
    monkeypatch.setattr(engine, "BATCH_MEMORY", 0.0)
    monkeypatch.setattr(engine, "BATCH_ELEMENTS", 2**25)
    monkeypatch.setattr(engine, "BATCH_MIN_BYTES", 2 * 8 * 10 * 4)  # two scores' float32
    assert engine.chunk_scores([rec], 10) == 2


def test_chunked_diagonal_equals_one_chunk(monkeypatch):
    """The diagonal's Σ_k δ_k² over chunks and batches equals one chunk to rounding."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 7)).double()
    data = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 7, (n,))) for n in (9, 4)]
    got = {}
    monkeypatch.setattr(engine, "BATCH_MIN_BYTES", 0)
    for memory in (1e9, 0.0, 0.5):
        monkeypatch.setattr(engine, "BATCH_MEMORY", memory)
        F = estimate(model, data, "categorical", "exact", "diagonal", progress=False)
        got[memory] = F.diagonal()
    R = reference_fisher(model, data, "categorical", "exact").diagonal()
    for memory in (0.0, 0.5):
        torch.testing.assert_close(got[memory], got[1e9], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1e9], R)


def test_batched_mc_matches_looped(monkeypatch):
    """Several MC samples: batched backward equals one backward per sample."""
    model, data = _mlp()
    args = (model, data, "categorical", "mc", "diagonal")
    F = estimate(*args, mc_samples=3, seed=1, progress=False)

    def looped(out, records, scores, accs, rows, stat, tick=None):
        for c in scores:
            grads = torch.autograd.grad(
                out, [r.output for r in records], c.to(out.dtype), retain_graph=True
            )
            pairs = engine._pairs(records, grads, stat)
            for acc in accs:
                acc.add(pairs, {}, rows)

    monkeypatch.setattr(engine, "_batched", looped)
    G = estimate(*args, mc_samples=3, seed=1, progress=False)
    torch.testing.assert_close(F.diagonal(), G.diagonal())


@pytest.mark.filterwarnings(
    "ignore::fisherflow.estimation.data.DataNotice"
)  # (ids, ids) on purpose
def test_hook_check_cached_and_keyed(monkeypatch):
    """The check runs once per model and input shape; a misuse is still reported."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids) @ self.emb.weight.T

    engine.clear_probe_cache()
    calls = []
    real = engine._check_first_batch
    monkeypatch.setattr(engine, "_check_first_batch", lambda *a: calls.append(1) or real(*a))
    model = Tied().double()
    ids = torch.randint(0, 5, (3, 4))
    R = reference_fisher(model, [(ids, ids)], "categorical", "empirical").diagonal()
    seen = []
    for _ in range(2):
        with pytest.warns(FallbackNotice, match="emb"):
            F = estimate(model, [(ids, ids)], "categorical", "empirical", progress=False)
        torch.testing.assert_close(F.diagonal(), R)
        seen.append(len(calls))
    # checked on the first call only: once to find the misuse, once more to confirm
    # the remaining hooks after demoting it
    assert seen == [2, 2]
    ids2 = torch.randint(0, 5, (2, 4))
    with pytest.warns(FallbackNotice, match="emb"):
        estimate(model, [(ids2, ids2)], "categorical", "empirical", progress=False)
    assert len(calls) > 2
    before = len(calls)
    model.emb = nn.Embedding(5, 3).double()  # new module: checked again
    with pytest.warns(FallbackNotice):
        estimate(model, [(ids, ids)], "categorical", "empirical", progress=False)
    assert len(calls) > before


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("categorical", torch.tensor([0, 2, -100, 1, 1])),
        ("bernoulli", torch.tensor([[1.0, 0.0, 1.0]] * 5)),
        ("gaussian", torch.linspace(-1, 1, 15).reshape(5, 3)),
        ("poisson", torch.tensor([[0.0, 2.0, 5.0]] * 5)),
    ],
)
def test_closed_form_output_grad_matches_autograd(name, target):
    """Built-in likelihoods' closed-form NLL gradients equal autograd's (masks included)."""
    from fisherflow.estimation.likelihoods import Likelihood, get_likelihood

    lik = get_likelihood(name)
    out = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prep = lik.prepare(out, target)
    assert prep.target is not None
    got = lik.nll_grad(prep.output, prep.target, prep.mask)
    ref = Likelihood.nll_grad(lik, prep.output, prep.target, prep.mask)
    torch.testing.assert_close(got, ref)


def test_syrk_factors_match_full_products(monkeypatch):
    """K-FAC factors accumulated with BLAS syrk (one triangle) equal full products."""
    from fisherflow.estimation import grams

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 48), nn.Tanh(), nn.Linear(48, 33)).double()
    x = torch.randn(50, 40, dtype=torch.float64)
    y = torch.randint(0, 33, (50,))
    data = [(x, y), (x[:20] * 0.5, y[:20])]
    monkeypatch.setattr(grams, "SYRK_MAX", 1024)
    F = estimate(model, data, "categorical", "empirical", "kfac", progress=False)
    monkeypatch.setattr(grams, "SYRK_MAX", 0)
    G = estimate(model, data, "categorical", "empirical", "kfac", progress=False)
    for g in F.A:  # type: ignore[attr-defined]
        torch.testing.assert_close(F.A[g], G.A[g])  # type: ignore[attr-defined]
        torch.testing.assert_close(F.G[g], G.G[g])  # type: ignore[attr-defined]
        torch.testing.assert_close(F.A[g], F.A[g].T)  # type: ignore[attr-defined]
    xa = torch.cat([torch.cat([d[0] for d in data]), torch.ones(70, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(F.A["0"], xa.T @ xa / 70)  # type: ignore[attr-defined]
    # the last layer's G is the summed squared output gradient of the observed labels
    out = torch.cat([model(d[0]) for d in data]).detach()
    lab = torch.cat([d[1] for d in data])
    r = torch.softmax(out, -1) - nn.functional.one_hot(lab, 33).double()
    torch.testing.assert_close(F.G["2"], r.T @ r)  # type: ignore[attr-defined]


def test_empirical_diagonal_wide_mlp_matches_reference():
    """The one-backward empirical/MC diagonal on layers wider than the syrk threshold."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(36, 40), nn.ReLU(), nn.Linear(40, 5)).double()
    x = torch.randn(9, 36, dtype=torch.float64)
    y = torch.randint(0, 5, (9,))
    for kind in ("empirical", "mc"):
        F = estimate(model, [(x, y)], "categorical", kind, progress=False, seed=3)
        R = reference_fisher(model, [(x, y)], "categorical", kind, seed=3)
        torch.testing.assert_close(F.diagonal(), R.diagonal())


def test_blocked_gram_factors_match_full_products(monkeypatch):
    """Upper-block-triangle factors (wide layers, conv patches, bias column) are exact."""
    from fisherflow.estimation import grams

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    ).double()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    data = [(x, y), (x[:2] * 0.5, y[:2])]
    monkeypatch.setattr(grams, "FACTOR_BLOCK", 8)
    monkeypatch.setattr(grams, "FACTOR_BLOCK_SIZE", 7)
    F = estimate(model, data, "categorical", "empirical", "kfac", progress=False)
    monkeypatch.setattr(grams, "FACTOR_BLOCK", 10**9)
    G = estimate(model, data, "categorical", "empirical", "kfac", progress=False)
    for g in F.A:  # type: ignore[attr-defined]
        torch.testing.assert_close(F.A[g], G.A[g])  # type: ignore[attr-defined]
        torch.testing.assert_close(F.G[g], G.G[g])  # type: ignore[attr-defined]
    h = torch.cat([model[:3](d[0]) for d in data]).detach()
    ha = torch.cat([h, torch.ones(8, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(F.A["3"], ha.T @ ha / 8)  # type: ignore[attr-defined]
    # a single-use Linear's K-FAC is exact for one row per batch: compare to the reference
    R = reference_fisher(model, [(x[:1], y[:1])], "categorical", "empirical")
    monkeypatch.setattr(grams, "FACTOR_BLOCK", 8)
    K = estimate(model, [(x[:1], y[:1])], "categorical", "empirical", "kfac", progress=False)
    idx = K.layout.indices(["3.weight", "3.bias"])
    torch.testing.assert_close(K.to_dense()[idx][:, idx], R[idx][:, idx])


def test_gram_into_blocked_equals_full_product(monkeypatch):
    """Both blockings (K-FAC factors and Gram blocks) accumulate the full x̃ᵀx̃ exactly."""
    from fisherflow.estimation import grams

    torch.manual_seed(3)
    x1, x2 = torch.randn(7, 300, dtype=torch.float64), torch.randn(5, 300, dtype=torch.float64)
    full = torch.cat([x1, x2]).T @ torch.cat([x1, x2])
    ones = torch.cat([torch.cat([x1, x2]), torch.ones(12, 1, dtype=torch.float64)], 1)
    monkeypatch.setattr(grams, "GRAM_BLOCK", 64)
    monkeypatch.setattr(grams, "GRAM_BLOCK_SIZE", 50)
    for factor, size in ((False, 50), (True, grams.FACTOR_BLOCK_SIZE)):
        acc = grams.gram_into(grams.gram_into(None, x1, factor=factor), x2, factor=factor)
        i = torch.arange(300)
        below = i[None, :] < (i[:, None] // size) * size  # left of each row's block
        assert acc[below].abs().max() == 0  # only the upper block triangle is computed
        torch.testing.assert_close(grams.symmetrize(acc, factor=factor), full)
        aug = grams.gram_into(grams.gram_into(None, x1, True, factor), x2, True, factor)
        torch.testing.assert_close(grams.symmetrize(aug, factor=factor), ones.T @ ones)


@pytest.mark.parametrize("budget", [None, 0])
def test_ekfac_replay_matches_second_pass(monkeypatch, budget):
    """EKFAC replaying the first pass equals streaming the data again (deterministic kinds)."""
    from fisherflow.estimation import accumulate

    model, data = _mlp()
    if budget is not None:
        monkeypatch.setattr(accumulate, "REPLAY_BYTES", budget)
    for kind in ("empirical", "exact"):
        E = estimate(model, data, "categorical", kind, "ekfac", progress=False)
        monkeypatch.setattr(accumulate, "REPLAY_BYTES", 0)
        S = estimate(model, data, "categorical", kind, "ekfac", progress=False)
        monkeypatch.setattr(accumulate, "REPLAY_BYTES", 2**28 if budget is None else budget)
        torch.testing.assert_close(E.to_dense(), S.to_dense())
    # one row, one batch: EKFAC of a single-use layer is exact
    x, y = data[0][0][:1], data[0][1][:1]
    E = estimate(model, [(x, y)], "categorical", "empirical", "ekfac", progress=False)
    R = reference_fisher(model, [(x, y)], "categorical", "empirical")
    idx = E.layout.indices(["3.weight", "3.bias"])
    torch.testing.assert_close(E.to_dense()[idx][:, idx], R[idx][:, idx])


def test_cached_capture_invalidated_and_no_leaks():
    """The per-model cache follows parameter changes, leaves no hooks, holds no model."""
    import gc
    import weakref

    from fisherflow.estimation import api

    model, data = _mlp()
    a = estimate(model, data, "categorical", "empirical", progress=False).diagonal()
    assert all(not m._forward_hooks for m in model.modules())
    assert api._PREPARED[model]
    for entry in api._PREPARED[model].values():
        assert entry.capture is not None and not entry.capture.records
    b = estimate(model, data, "categorical", "empirical", progress=False).diagonal()
    torch.testing.assert_close(a, b)
    # a replaced parameter (new identity/shape) and a params subset rebuild the state
    model[3].weight = nn.Parameter(torch.randn(3, 6, dtype=torch.float64))
    c = estimate(model, data, "categorical", "empirical", progress=False).diagonal()
    R = reference_fisher(model, data, "categorical", "empirical").diagonal()
    torch.testing.assert_close(c, R)
    sub = ["3.weight", "3.bias"]
    s = estimate(model, data, "categorical", "empirical", params=sub, progress=False)
    torch.testing.assert_close(s.diagonal(), R[-21:])
    model[3].weight.requires_grad_(False)
    with pytest.warns(FallbackNotice):  # a frozen weight: its bias falls back
        f = estimate(model, data, "categorical", "empirical", progress=False)
    assert "3.weight" not in f.layout.names
    ref = weakref.ref(model)
    del model, a, b, c, s, f, R
    gc.collect()
    assert ref() is None


def test_fallback_notice_every_call_with_cache():
    """A cached capture still warns about fallback modules on every call."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Scale()).double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))]
    for _ in range(3):
        with pytest.warns(FallbackNotice, match="'1'"):
            F = estimate(model, data, "categorical", "empirical", progress=False)
    R = reference_fisher(model, data, "categorical", "empirical")
    torch.testing.assert_close(F.diagonal(), R.diagonal())


class _GemmaStyleRMSNorm(nn.Module):
    """``(1 + w) ⊙ x / rms(x)``: has the parts of a Llama RMS norm but another formula."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dtype=torch.float64) * 0.1)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight) * x


def _rms_model(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6), norm, nn.Linear(6, 11)).double()


@pytest.mark.filterwarnings(
    "ignore::fisherflow.estimation.data.DataNotice"
)  # (ids, ids) on purpose
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_hugging_face_rms_norm_is_captured_and_exact(kind):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
    model = _rms_model(norm).double()
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    data = [(ids, ids)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackNotice)  # captured by hooks: no fallback
        F = estimate(model, data, "categorical", kind, structure="dense", progress=False)
    R = reference_fisher(model, data, "categorical", kind)
    # LlamaRMSNorm computes x̂ in float32 even for float64 inputs, so the reference
    # (autograd through the module) carries float32 rounding; fisherflow recomputes x̂
    # in the statistics dtype. Agreement is therefore at float32 level.
    torch.testing.assert_close(F.to_dense(), R, atol=1e-6, rtol=1e-4)


@pytest.mark.filterwarnings(
    "ignore::fisherflow.estimation.data.DataNotice"
)  # (ids, ids) on purpose
def test_rms_norm_with_one_plus_weight_is_also_exact():
    """``(1 + w) ⊙ x̂`` has the same weight gradient ``δ ⊙ x̂`` as ``w ⊙ x̂``."""
    model = _rms_model(_GemmaStyleRMSNorm(6))
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    data = [(ids, ids)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackNotice)
        F = estimate(model, data, "categorical", "empirical", structure="dense", progress=False)
    R = reference_fisher(model, data, "categorical", "empirical")
    torch.testing.assert_close(F.to_dense(), R, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind", ["empirical", "exact", "mc"])
def test_ekfac_basis_from_kept_rows_matches_eigh(monkeypatch, kind):
    """Few rows per factor: the eigenbasis from the rows (thin SVD) gives the same EKFAC."""
    from fisherflow.estimation.accumulators import KFACAcc, ekfac

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 12)).double()
    data = [(torch.randn(3, 40, dtype=torch.float64), torch.randint(0, 12, (3,)))]
    calls = []
    real = ekfac.gram_eigh

    def spy(rows):
        calls.append(tuple(rows.shape))
        return real(rows)

    monkeypatch.setattr(ekfac, "gram_eigh", spy)
    E = estimate(model, data, "categorical", kind, "ekfac", progress=False, seed=3)
    assert (3, 41) in calls  # the first layer's input factor came from its rows
    monkeypatch.setattr(KFACAcc, "kept_rows", lambda self, side, group: None)
    D = estimate(model, data, "categorical", kind, "ekfac", progress=False, seed=3)
    torch.testing.assert_close(E.to_dense(), D.to_dense())


def test_layer_settings_changed_in_place_are_noticed():
    """A cached capture follows a layer's rule and settings changed in place.

    Circular padding is captured by hooks (the input padded as the module pads it);
    ``scale_grad_by_freq`` set on an embedding afterwards makes it fall back.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    data = [(x, torch.randint(0, 3, (5,)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackNotice)
        estimate(model, data, "categorical", "empirical", "diagonal", progress=False)
        model[0].padding_mode = "circular"
        F = estimate(model, data, "categorical", "empirical", "diagonal", progress=False)
    R = reference_fisher(model, data, "categorical", "empirical")
    torch.testing.assert_close(F.diagonal(), R.diagonal())
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(12, 3)).double()
    ids = [(torch.randint(0, 5, (5, 4)), torch.randint(0, 3, (5,)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackNotice)
        estimate(emb, ids, "categorical", "empirical", "diagonal", progress=False)
    emb[0].scale_grad_by_freq = True
    with pytest.warns(FallbackNotice, match="'0'"):
        F = estimate(emb, ids, "categorical", "empirical", "diagonal", progress=False)
    R = reference_fisher(emb, ids, "categorical", "empirical")
    torch.testing.assert_close(F.diagonal(), R.diagonal())


def test_reference_and_estimate_both_evaluate_in_eval_mode():
    """Dropout is off in both, and every module's own flag comes back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    model[2].eval()  # a part deliberately kept in eval mode
    data = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))]
    F = estimate(model, data, "categorical", "empirical", "dense", progress=False)
    R = reference_fisher(model, data, "categorical", "empirical")
    torch.testing.assert_close(F.to_dense(), R)
    assert [m.training for m in model] == [True, True, False]


def test_weight_used_only_outside_its_module_falls_back():
    """A Linear whose module never runs (its weight used through F.linear) is caught."""

    class Outside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(nn.functional.linear(x, self.inner.weight, self.inner.bias))
            return self.head(h)

    torch.manual_seed(0)
    model = Outside().double()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    engine.clear_probe_cache()
    with pytest.warns(FallbackNotice, match="inner"):
        F = estimate(model, data, "categorical", "empirical", "diagonal", progress=False)
    R = reference_fisher(model, data, "categorical", "empirical")
    torch.testing.assert_close(F.diagonal(), R.diagonal())
