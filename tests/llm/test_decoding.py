"""IntervalLogitsProcessor drives Hugging Face generate() on a tiny GPT-2."""

from __future__ import annotations

import pytest
import torch

import fisherflow as ff

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_laplace():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 40, (6, 12))
    data = [{"input_ids": ids[:3], "labels": ids[:3]}, {"input_ids": ids[3:], "labels": ids[3:]}]
    la = ff.Laplace(
        model, likelihood="categorical", params="last_layer", kind="mc", prior_precision=1.0
    )
    la.fit(data, progress=False, seed=0)
    return model, la


def test_last_layer_of_a_tied_model_is_named(gpt2_laplace):
    _, la = gpt2_laplace
    assert la.names == ["transformer.wte.weight"]  # lm_head.weight is tied to it


@pytest.mark.parametrize("mode", ["robust", "explore", "adaptive_nucleus"])
def test_generate_with_intervals(gpt2_laplace, mode):
    model, la = gpt2_laplace
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    proc = ff.llm.IntervalLogitsProcessor(la, mode=mode, level=0.9, top_k=5)
    out = model.generate(
        prompt,
        logits_processor=[proc],
        do_sample=False,
        max_new_tokens=4,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    widths = proc.generated_widths(out)
    assert widths.shape == (2, 4)
    if mode != "adaptive_nucleus":  # the chosen token is always among the top_k
        assert bool(torch.isfinite(widths).all()) and bool((widths > 0).all())
    iv = ff.llm.token_intervals(la, prompt, top_k=5)
    bound = {"robust": iv.lower, "explore": iv.upper, "adaptive_nucleus": None}[mode]
    if bound is not None:  # greedy picks the token with the best bound
        first = iv.token_ids[:, -1].gather(1, bound[:, -1].argmax(1, keepdim=True))[:, 0]
        assert torch.equal(out[:, 4], first)
    else:  # a nucleus filter keeps the greedy token
        logits = model(prompt).logits[:, -1]
        assert torch.equal(out[:, 4], logits.argmax(1))


def test_bad_mode(gpt2_laplace):
    _, la = gpt2_laplace
    with pytest.raises(ValueError, match="mode must be one of"):
        ff.llm.IntervalLogitsProcessor(la, mode="greedy")
    with pytest.raises(ValueError, match="generation"):
        ff.llm.IntervalLogitsProcessor(la).generated_widths(torch.zeros(1, 3, dtype=torch.long))
