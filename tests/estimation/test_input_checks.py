"""Batches a user may bring: each bad one gets a named error or a one-time notice."""

from __future__ import annotations

import pytest
import torch
from cases_models import make_model_case
from torch import nn

from fisherflow.estimation import estimate, reference_fisher
from fisherflow.estimation.data import DataNotice, batch_rows


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


# --------------------------------------------------------------- batch size of a dict
def test_batch_rows_skips_a_broadcast_first_entry():
    inputs = {"position_ids": torch.arange(5)[None], "input_ids": torch.zeros(4, 5)}
    assert batch_rows(inputs) == 4
    assert batch_rows(inputs, torch.zeros(4, 5)) == 4


def test_batch_rows_takes_the_targets_when_inputs_disagree():
    inputs = {"pos": torch.arange(5), "ids": torch.zeros(3, 5)}
    assert batch_rows(inputs, torch.zeros(3, 5)) == 3
    with pytest.raises(ValueError, match=r"ambiguous.*'ids'.*3.*'pos'.*5"):
        batch_rows(inputs)


def test_batch_rows_rejects_empty_and_scalar_batches():
    with pytest.raises(ValueError, match="empty batch"):
        batch_rows({"x": torch.zeros(0, 3)})
    with pytest.raises(ValueError, match="dimension 0"):
        batch_rows({"x": torch.tensor(1.0)})


def test_llama_position_ids_first_gives_every_sequence():
    """``{"position_ids": (1, T), "input_ids": (B, T)}``: the Fisher of all B sequences."""
    model, data, lik = make_model_case("llama")
    assert next(iter(data[0])) == "position_ids"
    R = reference_fisher(model, data, lik, "empirical")
    F = estimate(model, data, lik, "empirical", "diagonal", progress=False)
    assert F.num_samples == 3 * 4  # every sequence, every shifted token
    torch.testing.assert_close(F.diagonal(), R.diagonal(), rtol=1e-9, atol=1e-11)
    # the first sequence alone is a different Fisher
    one = reference_fisher(model, [{k: v[:1] for k, v in data[0].items()}], lik, "empirical")
    assert (one.diagonal() - R.diagonal()).abs().max() > 1e-3


# ------------------------------------------------------------------- unchecked inputs
def _run(model, data, lik="categorical", kind="empirical", **kw):
    return estimate(model, data, lik, kind, "diagonal", progress=False, **kw)


def test_empty_batch_is_named():
    x, y = torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="inputs: a batch must have at least one row"):
        _run(_mlp(), [(x, y)])


def test_one_unbatched_sample_is_named():
    x, y = torch.ones(3, dtype=torch.float64), torch.tensor(1)
    with pytest.raises(ValueError, match=r"batch \(3 rows.*output shape \(2,\).*x\[None\]"):
        _run(_mlp(), [(x, y)], kind="exact")


@pytest.mark.parametrize(
    ("lik", "bad"), [("bernoulli", [0.0, 0.5, 1.0]), ("poisson", [1.0, -1.0, 0.0])]
)
def test_targets_outside_the_support_are_named(lik, bad):
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = nn.Linear(3, 1).double()
    y = torch.tensor(bad, dtype=torch.float64)[:, None]
    with pytest.raises(ValueError, match=f"targets must .* {lik} .*kind='empirical'"):
        _run(model, [(x, y)], lik=lik)
    _run(model, [(x, y.clamp(0, 1).round())], lik=lik)  # in the support: fine
    _run(model, [(x, y)], lik=lik, kind="exact")  # exact never reads target values


def test_every_target_masked_is_named():
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.full((2,), -100)
    with pytest.raises(ValueError, match=r"no observation.*masked \(-100\)"):
        _run(_mlp(), [(x, y), (x, y)])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_inputs_are_caught_at_their_batch(bad):
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 1])
    x2 = x.clone()
    x2[1, 2] = bad
    with pytest.raises(ValueError, match=r"inputs must be finite: inputs of batch 1"):
        _run(_mlp(), [(x, y), (x2, y)])
    with pytest.raises(ValueError, match=r"inputs must be finite: inputs\['x'\] of batch 0"):
        _run(_Kw(), [{"x": x2, "labels": y}])


class _Kw(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(x)


def test_non_finite_output_is_caught_at_its_batch():
    model = nn.Sequential(nn.Linear(3, 2), nn.Softplus(threshold=1e308)).double()
    with torch.no_grad():
        model[0].weight.fill_(400.0)
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="output contains NaN or Inf"):
        _run(model, [(x, torch.tensor([0, 1]))])


def test_targets_time_major_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5)).double()
    ids = torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match=r"targets must have the batch \(2 rows\).*\(3, 2\)"):
        _run(model, [(ids, ids.T.contiguous())])


class _TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        h = self.lin(x)
        return h.sum(-1), h  # (aux, logits)


def test_tuple_output_uses_its_first_tensor_with_a_notice():
    model = _TwoOut()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(DataNotice, match=r"tuple of 2 tensors.*first element") as seen:
        F = _run(model, [(x[:2], torch.ones(2, 1)), (x[2:], torch.ones(2, 1))], "gaussian")
    assert len([w for w in seen if issubclass(w.category, DataNotice)]) == 1  # one-time
    R = reference_fisher(model, [(x, torch.ones(4, 1))], "gaussian", "empirical")
    torch.testing.assert_close(F.diagonal(), R.diagonal())


def test_causal_pairs_are_flagged_and_shift_on_request():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5)).double()
    ids = torch.randint(0, 5, (2, 4))
    with pytest.warns(DataNotice, match="not shifted.*shift_labels=True"):
        F = _run(model, [(ids, ids)])
    assert F.num_samples == 8
    G = _run(model, [(ids, ids)], shift_labels=True)  # no notice: asked for
    H = _run(model, [{"input_ids": ids, "labels": ids}], forward=lambda m, x: m(x["input_ids"]))
    assert G.num_samples == H.num_samples == 6
    torch.testing.assert_close(G.diagonal(), H.diagonal(), rtol=0, atol=0)
