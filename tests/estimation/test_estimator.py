"""The reusable estimator: batch by batch equals ``estimate``; passes; options; update_from."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from cases import CASES, make_case
from torch import nn

import fisherflow as ff
from fisherflow.estimation import FallbackNotice, FisherEstimator, estimate, reference_fisher
from fisherflow.estimation.accumulate import Plan, Recorder
from fisherflow.estimation.accumulators import (
    ACCUMULATORS,
    CorrectionAcc,
    DiagonalAcc,
    construct,
    make_accumulator,
)
from fisherflow.matrices import ParamLayout

KINDS = ["exact", "mc", "empirical"]
STRUCTURES = ["dense", "diagonal", "block", "kfac", "ekfac", "lowrank"]


def _same(F, G):
    """Bit-identical matrices: dense form, state tensors and metadata."""
    assert (F.num_samples, F.kind, F.likelihood, F.structure) == (
        G.num_samples,
        G.kind,
        G.likelihood,
        G.structure,
    )
    assert torch.equal(F.to_dense(), G.to_dense())
    a, b = F._state()[0], G._state()[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _fed(model, data, lik, kind, structure, **kw):
    est = FisherEstimator(model, lik, kind, structure, **kw)
    for batch in data:
        est.update(batch)
    return est


@pytest.fixture(autouse=True)
def _quiet_fallbacks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackNotice)
        yield


@pytest.mark.parametrize("case", [*CASES, "deeplinear"])
@pytest.mark.parametrize("kind", KINDS)
def test_update_per_batch_equals_estimate(case, kind):
    """Every structure: one update per batch, then result(), is estimate bit for bit."""
    model, data, lik = make_case(case)
    for structure in STRUCTURES:
        est = _fed(model, data, lik, kind, structure, seed=4, mc_samples=2)
        F = est.result()
        G = estimate(model, data, lik, kind, structure, seed=4, mc_samples=2, progress=False)
        _same(F, G)
        assert est.num_samples == G.num_samples


@pytest.mark.parametrize("case", ["mlp", "transformer"])
@pytest.mark.parametrize("kind", KINDS)
def test_reset_then_refeed_gives_the_same(case, kind):
    model, data, lik = make_case(case)
    for structure in STRUCTURES:
        est = _fed(model, data, lik, kind, structure, seed=1)
        first = est.result()
        est.reset()
        assert est.num_samples == 0 and est.current_pass == 0
        for batch in data:
            est.update(batch)
        _same(est.result(), first)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_result_leaves_the_statistics_and_more_batches_add(structure):
    """result() mid-stream does not disturb the sums (K-FAC and dense symmetrise copies)."""
    model, data, lik = make_case("mlp")
    if structure == "ekfac":  # a finished EKFAC takes no more batches
        return
    est = FisherEstimator(model, lik, "exact", structure)
    est.update(data[0])
    _same(est.result(), estimate(model, data[:1], lik, "exact", structure, progress=False))
    _same(est.result(), estimate(model, data[:1], lik, "exact", structure, progress=False))
    est.update(data[1])
    _same(est.result(), estimate(model, data, lik, "exact", structure, progress=False))


def test_closed_form_linear_gaussian():
    """Σ x xᵀ / σ² for a linear model: the docstring's example, with a variance."""
    model = nn.Linear(2, 1, bias=False).double()
    est = FisherEstimator(model, "gaussian", "exact", "dense", variance=0.5)
    xs = [torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[0.0, 3.0]]).double()]
    assert [est.update((x, None)) for x in xs] == [1, 1]
    X = torch.cat(xs)
    torch.testing.assert_close(est.result().to_dense(), X.T @ X / 0.5, rtol=1e-14, atol=1e-14)
    assert est.num_samples == 2


# ---------------------------------------------------------------------- EKFAC's passes
def test_pass_counts():
    model, data, lik = make_case("mlp")
    for structure in STRUCTURES:
        est = FisherEstimator(model, lik, "exact", structure)
        assert est.passes == (2 if structure == "ekfac" else 1)
        assert est.current_pass == 0
        est.update(data[0])
        assert est.finish_pass() is False  # replayed (EKFAC) or single pass
        assert est.current_pass == 0


@pytest.mark.parametrize("kind", KINDS)
def test_ekfac_asks_for_the_data_again_past_the_replay_budget(monkeypatch, kind):
    from fisherflow.estimation import accumulate

    model, data, lik = make_case("cnn")
    monkeypatch.setattr(accumulate, "REPLAY_BYTES", 0)
    est = _fed(model, data, lik, kind, "ekfac", seed=2)
    with pytest.raises(RuntimeError, match="another pass"):
        est.result()
    assert est.current_pass == 1
    with pytest.raises(RuntimeError, match="no batch"):
        est.finish_pass()  # the second pass has not seen the data yet
    count = est.num_samples
    for batch in data:
        est.update(batch)
    assert est.num_samples == count  # the second pass revisits the same observations
    assert est.finish_pass() is False
    F = est.result()
    _same(F, estimate(model, data, lik, kind, "ekfac", seed=2, progress=False))
    with pytest.raises(RuntimeError, match="complete; call reset"):
        est.update(data[0])
    est.reset()
    est.update(data[0])  # a new estimate
    if kind != "mc":  # streaming the data again equals replaying it
        monkeypatch.setattr(accumulate, "REPLAY_BYTES", 2**28)
        R = estimate(model, data, lik, kind, "ekfac", progress=False)
        torch.testing.assert_close(F.to_dense(), R.to_dense(), rtol=1e-12, atol=1e-14)


def test_ekfac_finish_pass_protocol_with_replay():
    model, data, lik = make_case("mlp")
    est = _fed(model, data, lik, "empirical", "ekfac")
    assert est.finish_pass() is False  # replayed: complete
    assert est.finish_pass() is False  # and stays complete
    _same(est.result(), estimate(model, data, lik, "empirical", "ekfac", progress=False))


# ---------------------------------------------------------------------- options
def _plan() -> Plan:
    model = nn.Linear(2, 1).double()
    layout = ParamLayout.from_model(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return Plan(layout, names, {"": list(layout.names)}, {}, torch.float64, torch.device("cpu"))


def test_unknown_options_raise_type_error_naming_them():
    model, _, _ = make_case("mlp")
    with pytest.raises(TypeError, match="'foo'"):
        FisherEstimator(model, "categorical", "exact", foo=1.0)
    with pytest.raises(TypeError, match="'varaince'"):
        FisherEstimator(model, "gaussian", "exact", varaince=1.0)
    with pytest.raises(TypeError, match="'variance'"):  # options need a likelihood name
        FisherEstimator(model, ff.estimation.Gaussian(), "exact", variance=1.0)
    with pytest.raises(TypeError, match="'foo'"):
        estimate(model, [], "categorical", "exact", foo=1.0)
    FisherEstimator(model, "categorical", "exact", "diagonal", rank=5)  # a general option
    plan = _plan()
    with pytest.raises(TypeError, match="DiagonalAcc got an unexpected option 'rank'"):
        construct(DiagonalAcc, plan, rank=3)
    with pytest.raises(TypeError, match="unexpected option 'x'"):
        make_accumulator("kfac", plan, x=1)
    with pytest.raises(ValueError, match="structure must be one of"):
        make_accumulator("sparse", plan)
    assert make_accumulator("lowrank", plan, rank=3).rank == 3  # type: ignore[attr-defined]
    assert isinstance(make_accumulator("diagonal", plan, rank=3), DiagonalAcc)


def test_accumulators_name_their_options():
    """No accumulator swallows options: every parameter is explicit."""
    for cls in [*(s.accumulator for s in ACCUMULATORS.values()), CorrectionAcc, Recorder]:
        kinds = {p.kind for p in inspect.signature(cls).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, cls


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "fisher"}, "kind must be one of"),
        ({"structure": "sparse"}, "structure must be one of"),
        ({"mc_samples": 0}, "mc_samples must be a positive integer, got 0"),
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"convention": "mean"}, "convention must be one of"),
        ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),
        ({"params": []}, "params selects no trainable parameters"),
        ({"likelihood": "laplace"}, "likelihood must be one of"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    model, _, _ = make_case("mlp")
    args = {"likelihood": "categorical", "kind": "exact", **kwargs}
    with pytest.raises(ValueError, match=match):
        FisherEstimator(model, **args)


def test_bad_types_and_states():
    model, data, lik = make_case("mlp")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        FisherEstimator("model", lik, "exact")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forward must be callable"):
        FisherEstimator(model, lik, "exact", forward=3)  # type: ignore[arg-type]
    est = FisherEstimator(model, lik, "exact")
    for call in (est.result, est.all_reduce, est.finish_pass):
        with pytest.raises(RuntimeError, match="needs at least one update"):
            call()
    est.update(data[0])
    before = est.result()
    est.all_reduce()  # no process group: nothing to sum
    _same(est.result(), before)
    est.update(data[1])  # and feeding goes on


class _TiedByMatmul(nn.Module):
    """An embedding matrix reused outside its module: only the hook check can see it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)

    def forward(self, ids):
        return self.emb(ids) @ self.emb.weight.T


@pytest.mark.parametrize("how", ["update", "update_from"])
def test_first_update_checks_the_hooks(how):
    """The first batch (of each reset) demotes a parameter its hooks would miss."""
    torch.manual_seed(0)
    model = _TiedByMatmul().double()
    data = [(torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))) for _ in range(2)]
    R = reference_fisher(model, data, "categorical", "empirical")
    est = FisherEstimator(model, "categorical", "empirical", "diagonal")
    for round_ in range(2):
        for i, (x, y) in enumerate(data):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FallbackNotice)
                if how == "update":
                    est.update((x, y))
                else:
                    with est.update_from((x, y)) as record:
                        record(model(x))
            notices = [w for w in caught if issubclass(w.category, FallbackNotice)]
            assert len(notices) == (1 if i == 0 else 0), (round_, i)
            assert "emb" in str(notices[0].message) if notices else True
        torch.testing.assert_close(est.result().diagonal(), R.diagonal(), rtol=1e-10, atol=1e-12)
        est.reset()


# ---------------------------------------------------------------------- update_from
class _Scaled(nn.Module):
    """A parameterised module without a capture rule (per-sample fallback)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def _case(name):
    if name != "fallback":
        return make_case(name)
    model, data, lik = make_case("mlp")
    return nn.Sequential(model[0], _Scaled(), model[1], model[2]).eval(), data, lik


@pytest.mark.parametrize("case", ["mlp", "transformer", "tied", "fallback"])
@pytest.mark.parametrize("kind", KINDS)
def test_update_from_equals_update(case, kind):
    """The caller's forward and backward, then the estimator's: same Fisher, same grads."""
    model, data, lik = _case(case)
    for structure in ("diagonal", "kfac", "ekfac", "dense"):
        est = FisherEstimator(model, lik, kind, structure, seed=7)
        grads = []
        for x, y in data:
            model.zero_grad()
            with est.update_from((x, y)) as record:
                out = model(x)
                record(out)
                loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
                loss.backward(retain_graph=True)
            grads.append([p.grad.clone() for p in model.parameters()])
        F = est.result()
        G = _fed(model, data, lik, kind, structure, seed=7).result()
        torch.testing.assert_close(F.to_dense(), G.to_dense(), rtol=1e-12, atol=1e-14)
        assert F.num_samples == G.num_samples
        for (x, y), got in zip(data, grads, strict=True):  # the caller's own gradients
            model.zero_grad()
            out = model(x)
            nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            for p, g in zip(model.parameters(), got, strict=True):
                # attention runs an explicit (equivalent) forward while captured
                torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
    assert all(not m._forward_hooks for m in model.modules())


def test_update_from_misuse():
    model, data, lik = make_case("mlp")
    x, y = data[0]
    est = FisherEstimator(model, lik, "empirical")
    with pytest.raises(RuntimeError, match="call record"), est.update_from((x, y)):
        model(x)
    with pytest.raises(ValueError, match="no autograd graph"), est.update_from((x, y)) as record:
        with torch.no_grad():
            record(model(x))
    with pytest.raises(RuntimeError, match="already called"), est.update_from((x, y)) as record:
        out = model(x)
        record(out)
        record(out)
    with pytest.raises(KeyError), est.update_from((x, y)):
        model(x)
        raise KeyError("the caller's own error")
    assert all(not m._forward_hooks for m in model.modules())
    assert est.num_samples == 0
    with est.update_from((x, y)) as record:
        record(model(x))
    _same(est.result(), estimate(model, data[:1], lik, "empirical", progress=False))


def test_estimator_matches_reference_on_a_tied_transformer():
    """The estimator against the dense brute force (not only against estimate)."""
    model, data, lik = make_case("tied")
    est = _fed(model, data, lik, "empirical", "dense")
    R = reference_fisher(model, data, lik, "empirical")
    torch.testing.assert_close(est.result().to_dense(), R, rtol=1e-9, atol=1e-11)


@pytest.mark.distributed
def test_all_reduce_over_two_processes_equals_one(tmp_path, torchrun):
    """torchrun (gloo, 2 processes): update per shard + all_reduce = one process on all."""
    from pathlib import Path

    worker = Path(__file__).with_name("estimator_dist_worker.py")
    assert "ESTIMATOR-DISTRIBUTED-OK" in torchrun(worker, cwd=tmp_path, timeout=300)


def test_update_from_on_a_hugging_face_dict_batch():
    """Dict batches (labels shifted for a causal LM) and outputs with ``.logits``."""
    model, data, lik = make_case("gpt2")
    est = FisherEstimator(model, lik, "empirical", "kfac")
    for batch in data:
        with est.update_from(batch) as record:
            out = model(**batch)  # the model's own loss from its labels
            record(out)
            out.loss.backward(retain_graph=True)
    G = estimate(model, data, lik, "empirical", "kfac", progress=False)
    torch.testing.assert_close(est.result().to_dense(), G.to_dense(), rtol=1e-12, atol=1e-14)
    assert est.num_samples == G.num_samples
