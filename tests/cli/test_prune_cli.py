"""``fisherflow prune``: a Hugging Face checkpoint round trip, atomic output, clean errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fisherflow as ff
from fisherflow.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny GPT-2 (HF ``Conv1D`` layers, tied head) saved with ``save_pretrained``."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=32
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path / "tiny"
    model.save_pretrained(path, safe_serialization=True)
    (path / "tokenizer_config.json").write_text("{}")
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    F = ff.estimate(
        model,
        [{"input_ids": ids, "labels": ids}],
        "categorical",
        kind="exact",
        structure="kfac",
        progress=False,
    )
    F.save(str(tmp_path / "f.safetensors"))
    return path, tmp_path / "f.safetensors", model, F


def _args(path, fisher, out, *extra):
    return ["prune", str(path), "--fisher", str(fisher), "--out", str(out), *extra]


def test_cli_writes_a_checkpoint_equal_to_the_api_result(checkpoint, tmp_path, capsys):
    path, fisher, model, F = checkpoint
    out = tmp_path / "pruned"
    extra = ["--pattern", "2:4", "--method", "obs", "--rel-damping", "0.01"]
    assert main(_args(path, fisher, out, *extra)) == 0
    assert "pruned" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = copy.deepcopy(model)
    masks = ff.apps.prune(expected, F, None, pattern="2:4", method="obs", rel_damping=0.01)
    assert set(masks) == {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    }
    got = dict(loaded.named_parameters())
    for name, p in expected.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=0, atol=0)
    for name, mask in masks.items():
        assert bool((got[name][~mask] == 0).all())
        assert float((~mask).float().mean()) == 0.5
    assert (out / "tokenizer_config.json").is_file()
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "obs" and report["sparsity"] == 0.5


def test_cli_fails_cleanly_and_writes_nothing(checkpoint, tmp_path, capsys):
    path, fisher, _, _ = checkpoint
    out = tmp_path / "pruned"

    def fails(args, message):
        with pytest.raises(SystemExit) as err:
            main(args)
        assert err.value.code == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]

    fails(_args(path, fisher, out, "--sparsity", "1.5"), "sparsity must be in [0, 1)")
    fails(_args(path, fisher, out, "--pattern", "3:5"), "multiple of 5")
    fails(_args(tmp_path / "absent", fisher, out, "--sparsity", "0.5"), "MODEL must be")

    other = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    )
    F_other = ff.estimate(
        other,
        [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": None}],
        "categorical",
        kind="mc",
        structure="diagonal",
        seed=0,
        progress=False,
    )
    F_other.save(str(tmp_path / "other.safetensors"))
    fails(
        _args(path, tmp_path / "other.safetensors", out, "--sparsity", "0.5"),
        "fisher: its layout does not match",
    )

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    tensors.pop(next(k for k in tensors if k.endswith("mlp.c_fc.weight")))
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    fails(_args(broken, fisher, out, "--sparsity", "0.5"), "lacks 1 tensors")


def test_demo_section_tabulates_every_method_and_plots(tmp_path):
    from fisherflow.cli.demo_prune import SPARSITIES, demo_section

    lines = demo_section(tmp_path)
    rows = [line for line in lines if line.startswith(("| magnitude", "| OBD", "| OBS"))]
    assert len(rows) == 4
    for row in rows:
        accs = [float(c) for c in row.strip("|").split("|")[1 : 1 + len(SPARSITIES)]]
        assert all(0.0 <= a <= 1.0 for a in accs)
    assert (tmp_path / "pruning_accuracy.png").stat().st_size > 0


def test_cli_choices_are_the_apis():
    from fisherflow.apps import masks, scores
    from fisherflow.cli import prune as cli_prune

    assert set(cli_prune.METHODS) == set(scores.METHODS)
    assert cli_prune.SCOPES == masks.SCOPES
