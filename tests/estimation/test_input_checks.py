"""Batches a user may bring: each bad one gets a named error or a one-time notice."""

from __future__ import annotations

import pytest
import torch
from cases_models import make_model_case
from torch import nn

from fisherflow.estimation import estimate, reference_fisher
from fisherflow.estimation.data import batch_rows


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
