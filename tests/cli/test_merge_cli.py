"""``fisherflow merge``: two sharded Hugging Face checkpoints in, one that loads out."""

from __future__ import annotations

import json
import re
import weakref

import numpy as np
import pytest
import torch

import fisherflow as ff
from fisherflow.cli import main, merge_fisher, merge_memory, merge_stream

transformers = pytest.importorskip("transformers")
pytest.importorskip("yaml")


def _tiny(arch: str, seed: int, n_embd: int = 16):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=40,
            n_positions=16,
            n_embd=n_embd,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=n_embd,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg)


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(seed))


def _fisher(model, seed: int, structure: str) -> ff.FisherMatrix:
    """The empirical Fisher of ``model`` on ``_tokens(seed)`` (labels = inputs)."""
    ids = _tokens(seed)
    return ff.estimate(
        model,
        [{"input_ids": ids, "labels": ids}],
        "categorical",
        "empirical",
        structure,
        progress=False,
    )


def _setup(tmp_path, arch: str, structure: str):
    """Two sharded checkpoints, one Fisher file, one token file; the config."""
    paths, models = [], []
    for i in range(2):
        model = _tiny(arch, seed=i)
        path = tmp_path / f"{arch}-{i}"
        model.save_pretrained(path, max_shard_size="20KB")
        paths.append(path)
        models.append(transformers.AutoModelForCausalLM.from_pretrained(path))
    assert (paths[0] / "model.safetensors.index.json").is_file()  # really sharded
    F0 = _fisher(models[0], 0, structure)
    F0.save(tmp_path / "f0.safetensors")
    np.savez(tmp_path / "tokens.npz", input_ids=_tokens(1).numpy())
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"""
models:
  - model: {paths[0].name}
    weight: 2.0
    fisher: f0.safetensors
  - model: {paths[1].name}
    fisher:
      estimate: {{data: tokens.npz, kind: empirical, structure: {structure}, batch_size: 4}}
max_shard_size: 10KB
damping: 1.0e-4
"""
    )
    F1 = _fisher(models[1], 1, structure)
    return config, paths, models, [F0, F1]


@pytest.mark.parametrize(
    ("arch", "structure"), [("gpt2", "diagonal"), ("llama", "kfac"), ("gpt2", "block")]
)
def test_cli_merges_sharded_checkpoints_like_the_python_api(tmp_path, arch, structure, monkeypatch):
    config, _paths, models, fishers = _setup(tmp_path, arch, structure)
    live: list[int] = [0, 0]  # tensors read and still alive, most at once

    def counted(source, key):
        t = read(source, key)
        live[0] += 1
        live[1] = max(live[1], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    read = merge_stream.read_tensor
    monkeypatch.setattr(merge_stream, "read_tensor", counted)

    def no_whole_load(path):
        raise AssertionError(f"{path} loaded whole")

    # the Fisher file is read unit by unit (a diagonal slice, or one layer's K-FAC
    # factors / a slice of its rest diagonal), never whole
    monkeypatch.setattr(merge_fisher, "load", no_whole_load)
    units_live = [0, 0]  # Fisher units read and still alive, most at once
    unit_of = merge_fisher.FisherSource.unit

    def counted_unit(self, unit, names):
        F = unit_of(self, unit, names)
        units_live[0] += 1
        units_live[1] = max(units_live[1], units_live[0])
        weakref.finalize(F, lambda: units_live.__setitem__(0, units_live[0] - 1))
        return F

    monkeypatch.setattr(merge_fisher.FisherSource, "unit", counted_unit)
    out = tmp_path / "merged"
    assert main(["merge", str(config), "--out", str(out), "--no-progress"]) == 0
    # streamed: never more than one merge unit per input alive at once; a diagonal
    # merge (in place, input by input) holds one input tensor at a time
    unit = max(len(n) for n in ff.apps.merge_units(fishers[0]).values())
    assert 0 < live[1] <= (1 if structure == "diagonal" else 2 * unit), live
    # one unit's Fisher per model at a time (the diagonal path reads slices instead)
    assert units_live[1] <= (0 if structure == "diagonal" else 2), units_live
    assert (units_live[1] > 0) == (structure != "diagonal")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the output is sharded too
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = ff.apps.merge(models, fishers, weights=[2.0, 1.0], damping=1e-4)
    on_disk = merged_model.state_dict()
    in_layers = {n for names in fishers[0].groups().values() for n in names}
    for key in index["weight_map"]:
        if structure == "diagonal" or (key in fishers[0].layout.names and key not in in_layers):
            # the in-place path (diagonal Fishers, K-FAC's parameters outside the
            # layers) does merge_block's arithmetic
            assert torch.equal(on_disk[key], expected[key]), key
        elif structure == "block":
            # the same blocks, but LAPACK's eigh rounds differently for the file-mapped
            # copy (another memory alignment), and the pseudo-inverse of these
            # rank-deficient blocks (32 tokens) amplifies that to ~1e-5
            torch.testing.assert_close(on_disk[key], expected[key], rtol=1e-3, atol=3e-5)
        else:
            torch.testing.assert_close(on_disk[key], expected[key], rtol=1e-6, atol=1e-7)
    # a Fisher merge, not an average: some tensor differs from the weighted average
    avg = {
        k: (2 * a + b) / 3
        for (k, a), b in zip(
            models[0].state_dict().items(), models[1].state_dict().values(), strict=True
        )
    }
    assert max(float((on_disk[k] - avg[k]).abs().max()) for k in index["weight_map"]) > 1e-4
    assert (out / "config.json").is_file()
    report = json.loads((out / "merge_report.json").read_text())
    assert len(report["fisher_mass_per_model"]) == 2 and report["units"]
    assert all(abs(sum(u["share"]) - 1) < 1e-9 for u in report["units"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, capsys):
    config, paths, _models, _fishers = _setup(tmp_path, "gpt2", "diagonal")
    out = tmp_path / "merged"

    def fails(text: str, match: str) -> None:
        config.write_text(text)
        with pytest.raises(SystemExit) as err:
            main(["merge", str(config), "--out", str(out), "--no-progress"])
        assert err.value.code == 2
        assert re.search(match, capsys.readouterr().err)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]

    _tiny("gpt2", 3, n_embd=8).save_pretrained(tmp_path / "narrow")
    fails(
        f"models:\n  - model: {paths[0].name}\n  - model: narrow\n",
        r"checkpoints\[1\]\['transformer\.\S+'\] has shape \(\d+,?\s?\d*\), checkpoints\[0\]'s",
    )
    # a checkpoint with a tensor missing from its shard
    broken = tmp_path / "broken"
    model = _tiny("gpt2", 4)
    model.save_pretrained(broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    tensors.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    fails(
        f"models:\n  - model: {paths[0].name}\n  - model: broken\n",
        re.escape(
            "checkpoints[1] does not have the same tensors as checkpoints[0]: missing "
            "['transformer.h.1.mlp.c_fc.weight']"
        ),
    )
    # a Fisher of another architecture
    other = _fisher(_tiny("llama", 0), 0, "diagonal")
    other.save(tmp_path / "other.safetensors")
    fails(
        f"models:\n  - {{model: {paths[0].name}, fisher: f0.safetensors}}\n"
        f"  - {{model: {paths[1].name}, fisher: other.safetensors}}\n",
        re.escape("fishers[1]'s layout differs from fishers[0]'s"),
    )
    # a K-FAC file whose factor does not fit its layer (streamed: checked on opening)
    kfac = _fisher(_models[0], 0, "kfac")
    kfac.save(tmp_path / "k.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "k.safetensors", "pt") as handle:
        meta = handle.metadata()
    tensors = load_file(tmp_path / "k.safetensors")
    tensors["G.1"] = torch.eye(3)
    save_file(tensors, tmp_path / "k.safetensors", metadata=meta)
    fails(
        f"models:\n  - {{model: {paths[0].name}, fisher: k.safetensors}}\n"
        f"  - {{model: {paths[1].name}, fisher: k.safetensors}}\n",
        r"k\.safetensors: G\.1 \(layer '[^']+'\) has shape \(3, 3\), expected",
    )
    fails(
        f"models:\n  - model: {paths[0].name}\n    wieght: 2\n  - model: x\n",
        re.escape("unknown keys ['wieght']"),
    )
    fails(
        f"models:\n  - model: {paths[0].name}\n  - model: {paths[1].name}\ndtype: int8\n",
        "dtype must be one of",
    )
    # an output directory that is not empty is refused, and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config.write_text(f"models:\n  - model: {paths[0].name}\n  - model: {paths[1].name}\n")
    with pytest.raises(SystemExit):
        main(["merge", str(config), "--out", str(out), "--no-progress"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_shard_that_would_overflow_is_written_before_the_unit(tmp_path):
    writer = merge_stream.ShardWriter(tmp_path, max_bytes=100)
    assert not writer.make_room(40)  # nothing queued
    writer.add("a", torch.zeros(15))  # 60 bytes
    assert not writer.make_room(40) and not writer.shards
    assert writer.make_room(41) and len(writer.shards) == 1
    writer.add("b", torch.zeros(5))
    assert writer.close() == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    merge_memory.map_large_blocks()  # no-ops off glibc; never fail
    merge_memory.release_freed_memory()


def test_a_block_file_is_read_per_group_and_checked(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    layout = ff.ParamLayout.from_shapes({"a": (2,), "b": (1,)})
    blocks = {"A": torch.tensor([[2.0, 1.0], [1.0, 2.0]]), "B": torch.tensor([[3.0]])}
    F = ff.Block(blocks, {"A": ["a"], "B": ["b"]}, layout, num_samples=4.0)
    F.save(tmp_path / "f.safetensors")
    source = merge_fisher.FisherSource(tmp_path / "f.safetensors")
    assert source.streamed and source.units() == {"A": ["a"], "B": ["b"]}
    assert source.unit_bytes("A", ["a"]) == 16
    assert torch.equal(source.unit("A", ["a"]).to_dense(), blocks["A"])
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors["block.0"] = torch.eye(3)  # group A covers 2 entries
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"block\.0 \(group 'A'\) has shape \(3, 3\)"):
        merge_fisher.FisherSource(tmp_path / "bad.safetensors")
