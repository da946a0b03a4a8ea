"""Models users bring, against the dense float64 reference (dense, diagonal, block).

Hugging Face BERT with padding, Llama (GQA, tied embeddings, ``position_ids`` first),
``nn.TransformerEncoder`` with a padding mask, GRU/LSTM/GRUCell models and odd
convolutions: every estimate equals ``reference_fisher`` to ~1e-10.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from cases_models import MODEL_CASES, make_model_case
from torch import nn

from fisherflow.estimation import FallbackNotice, estimate, reference_fisher
from fisherflow.estimation.engine import mismatched

#: Cases whose parameters leave hooks (recurrent layers): each notice is expected
#: there, and only there.
NOTIFIED = {"gru", "bilstm", "grucell"}


@functools.cache
def _ref(case: str, kind: str) -> torch.Tensor:
    model, data, lik = make_model_case(case)
    return reference_fisher(model, data, lik, kind)


def _est(case: str, kind: str, structure: str):
    model, data, lik = make_model_case(case)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", FallbackNotice)
        F = estimate(model, data, lik, kind, structure, progress=False)
    notices = [w for w in seen if issubclass(w.category, FallbackNotice)]
    assert bool(notices) == (case in NOTIFIED), [str(w.message) for w in notices]
    return F


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_dense_and_diagonal_match_reference(case, kind):
    R = _ref(case, kind)
    D = _est(case, kind, "dense").to_dense()
    torch.testing.assert_close(D, R, rtol=1e-9, atol=1e-10)
    d = _est(case, kind, "diagonal").diagonal()
    torch.testing.assert_close(d, R.diagonal(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_block_matches_reference_blocks(case):
    R = _ref(case, "empirical")
    B = _est(case, "empirical", "block")
    M = torch.zeros_like(R)
    for names in B.groups().values():
        idx = B.layout.indices(names)
        M[idx[:, None], idx] = R[idx[:, None], idx]
    torch.testing.assert_close(B.to_dense(), M, rtol=1e-9, atol=1e-10)


def test_bert_attention_stays_on_hooks():
    """Key biases have a zero gradient in theory: rounding noise demotes nothing."""
    # the key bias gradient is rounding noise, far below the model's gradient scale
    R = _ref("bert", "empirical")
    F = _est("bert", "empirical", "diagonal")  # asserts no FallbackNotice
    key_bias = F.layout.indices(["bert.encoder.layer.0.attention.self.key.bias"])
    assert float(R.diagonal()[key_bias].max()) < 1e-30 * float(R.diagonal().max()) + 1e-40


def test_llama_with_float32_internals():
    """HF Llama upcasts its norms and softmax to float32: agreement to float32 precision."""
    R = _ref("llama_upcast", "empirical")
    d = _est("llama_upcast", "empirical", "diagonal").diagonal()
    assert float((d - R.diagonal()).abs().max()) < 1e-6 * float(R.diagonal().abs().max())


def test_noise_is_no_mismatch_but_a_missed_use_is():
    g = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tiny = torch.full((3,), 1e-22, dtype=torch.float64)
    # a zero-in-theory gradient computed as noise, next to a gradient of size ~1
    assert mismatched([(g, g.clone()), (tiny, -tiny)]) == [False, False]
    # half a parameter's gradient missing is a mismatch
    assert mismatched([(g, g.clone()), (g, g / 2)]) == [False, True]
    # a parameter with no hook gradient at all, whose true gradient is not small
    assert mismatched([(g, g.clone()), (g, None)]) == [False, True]


class _Gate(nn.Module):
    """A parameterised module with data-dependent control flow (``vmap`` cannot run it)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 0:  # .item() under vmap fails
            return torch.tanh(x * self.w)
        return x


def test_per_example_loop_when_vmap_fails():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), _Gate(), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 2, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1]))]
    R = reference_fisher(model, data, "categorical", "empirical")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", FallbackNotice)
        F = estimate(model, data, "categorical", "empirical", "dense", progress=False)
    loops = [w for w in seen if "per-example autograd loop" in str(w.message)]
    assert len(loops) == 1 and "vmap failed" in str(loops[0].message)
    torch.testing.assert_close(F.to_dense(), R, rtol=1e-10, atol=1e-12)


class _MyLinear(nn.Module):
    """A user's own linear layer (not an ``nn.Linear``)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def test_one_layer_type_entry_captures_a_new_layer(monkeypatch):
    """Appending a ``LayerType`` is all it takes: capture, plan and signature follow."""
    from fisherflow.estimation import handlers
    from fisherflow.estimation.layers import LinearHandler

    torch.manual_seed(0)
    model = nn.Sequential(_MyLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    data = [(x, torch.tensor([0, 1, 1, 0, 1]))]
    R = reference_fisher(model, data, "categorical", "exact")
    with pytest.warns(FallbackNotice, match="_MyLinear"):
        estimate(model, data, "categorical", "exact", "diagonal", progress=False)
    entry = handlers.LayerType(
        lambda m: isinstance(m, _MyLinear), lambda m: (LinearHandler(), None)
    )
    monkeypatch.setattr(handlers, "LAYER_HANDLERS", [*handlers.LAYER_HANDLERS, entry])
    F = estimate(model, data, "categorical", "exact", "kfac", progress=False)  # no notice
    assert "0" in F.kron_groups  # a Kronecker layer now
    D = estimate(model, data, "categorical", "exact", "dense", progress=False)
    torch.testing.assert_close(D.to_dense(), R, rtol=1e-10, atol=1e-12)


def test_per_row_grads_keep_shared_inputs_shared_in_chunks():
    """A shared input whose dimension 0 equals a chunk's row count is not split."""
    from fisherflow.estimation.persample import per_row_grads, per_row_grads_loop
    from fisherflow.estimation.reference import Wrapped

    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(3)
    inputs = {
        "x": torch.randn(4, 3, dtype=torch.float64, generator=g),
        "scale": torch.tensor([0.5, 2.0], dtype=torch.float64),  # shared, 2 = chunk rows
    }
    wrapped = Wrapped(lin, lambda m, b: m(b["x"]) * b["scale"])
    cots = torch.randn(2, 4, 2, dtype=torch.float64, generator=g)
    params = dict(lin.named_parameters())
    names = ["weight", "bias"]
    chunked = per_row_grads(wrapped, names, params, inputs, cots, 4, max_elements=2 * 2 * 8)
    looped = per_row_grads_loop(wrapped, names, params, inputs, cots, 4)
    for n in names:
        torch.testing.assert_close(chunked[n], looped[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_ekfac_never_farther_than_kfac_and_rest_is_exact(case):
    """K-FAC keeps the exact diagonal off its Kronecker layers (grouped convolutions,
    recurrent layers, norms); EKFAC is never farther from the exact Fisher."""
    R = _ref(case, "exact")
    K = _est(case, "exact", "kfac")
    E = _est(case, "exact", "ekfac").to_dense()
    assert (E - R).norm() <= (K.to_dense() - R).norm() * (1 + 1e-10)
    idx = K.layout.indices(K.rest_names)
    torch.testing.assert_close(K.diagonal()[idx], R.diagonal()[idx], rtol=1e-9, atol=1e-10)
