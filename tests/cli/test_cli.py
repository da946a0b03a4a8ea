"""The ``fisherflow`` command: estimate → file → inspect, the demo, and clean errors."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import fisherflow as ff
from fisherflow.cli import main
from fisherflow.cli.estimate import load_data

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))

    def not_a_model():
        return 3

    def broken():
        raise RuntimeError("bad init")

    def wrong_width():
        return nn.Linear(10, 3)

    def mlp64():
        return mlp().double()

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "cli_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_models:mlp"


def test_estimate_then_inspect(tmp_path, factory, capsys):
    out = tmp_path / "fisher.safetensors"
    args = [
        "estimate",
        "--model",
        factory,
        "--data",
        "digits",
        "--limit",
        "96",
        "--kind",
        "exact",
        "--structure",
        "kfac",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    F = ff.load(out)
    assert (F.structure, F.kind, F.likelihood, F.num_samples) == (
        "kfac",
        "exact",
        "categorical",
        96,
    )

    # the file holds what the Python API computes on the same model and data
    import cli_models

    expected = ff.estimate(
        cli_models.mlp(),
        load_data("digits", 64, 96),
        likelihood="categorical",
        kind="exact",
        structure="kfac",
        progress=False,
    )
    torch.testing.assert_close(F.to_dense(), expected.to_dense())

    capsys.readouterr()
    assert (
        main(
            ["inspect", str(out), "--json", "--damping", "0.1", "--plots", str(tmp_path / "plots")]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["trace"] == pytest.approx(float(F.trace()), rel=1e-5)
    eig = F.eigvalsh()
    assert info["top_eigenvalues"][:3] == pytest.approx(eig[:3].tolist(), rel=1e-4)
    d_eff = float((eig / (eig + 0.1)).sum())
    assert json.dumps(info).count("effective") >= 1
    assert pytest.approx(d_eff, rel=1e-4) in [v for k, v in _flat(info) if "effective" in k]
    assert sorted(p.suffix for p in (tmp_path / "plots").iterdir()) == [".png", ".png"]


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


MODEL = ["estimate", "--kind", "exact", "--out", "x.safetensors", "--limit", "64", "--model"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["estimate", "--model", "no_colon", "--kind", "mc", "--out", "x"], "module:factory"),
        ([*MODEL, "cli_models:not_a_model"], "must return an nn.Module, got int"),
        ([*MODEL, "no_such_module:mlp"], "--model no_such_module:mlp: no module named"),
        ([*MODEL, "cli_broken:mlp"], "importing 'cli_broken' failed: RuntimeError: at import"),
        ([*MODEL, "cli_models:mlpp"], "has no attribute 'mlpp'; its callables: ["),
        ([*MODEL, "cli_models:NOT_CALLABLE"], "'NOT_CALLABLE' is a int, not callable"),
        ([*MODEL, "cli_models:broken"], "calling it raised RuntimeError: bad init"),
        (
            [*MODEL, "cli_models:wrong_width"],
            "fails on the first batch of --data (inputs of shape (64, 64)): RuntimeError: mat1",
        ),
        ([*MODEL, "cli_models:mlp", "--data", "data.csv"], "--data must be"),
        ([*MODEL, "cli_models:mlp", "--data", "bad.npz"], "--data bad.npz: cannot read it"),
        ([*MODEL, "cli_models:mlp", "--likelihood", "cauchy"], "'cauchy'"),
        (["inspect", "missing.safetensors"], "no Fisher file"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    tmp_path, factory, capsys, monkeypatch, argv, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli_broken.py").write_text("raise RuntimeError('at import')\n")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fisherflow: error:") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*MODEL, "m:f", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        ([*MODEL, "m:f", "--limit", "-5"], "argument --limit: must be an integer >= 1, got '-5'"),
        ([*MODEL, "m:f", "--mc-samples", "1.5"], "argument --mc-samples: must be an integer"),
        (
            ["estimate", "--model", "m:f", "--out", "x"],
            "the following arguments are required: --kind",
        ),
        (["inspect", "f.safetensors", "--damping", "0"], "argument --damping: must be a finite"),
        (["inspect", "f.safetensors", "--top", "0"], "argument --top: must be an integer >= 1"),
        (["demo", "--rows", "0"], "argument --rows: must be an integer >= 1"),
    ],
)
def test_bad_option_values_are_rejected_by_name(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_model_module_in_the_working_directory(tmp_path, monkeypatch, capsys):
    # As `python -m` does, the current directory is searched first for --model.
    (tmp_path / "cli_cwd_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    args = [*MODEL, "cli_cwd_models:mlp", "--no-progress"]
    assert main(args) == 0
    assert ff.load(tmp_path / "x.safetensors").num_samples == 64
    assert sys.path == path_before  # the directory is on the path only while importing


@pytest.mark.parametrize(("stored", "factory_name"), [("float64", "mlp"), ("float32", "mlp64")])
def test_npz_arrays_are_cast_to_the_model_dtype(tmp_path, factory, stored, factory_name):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 64)).astype(stored)
    y = rng.integers(0, 10, 40)
    np.savez(tmp_path / "d.npz", inputs=x, targets=y)
    out = tmp_path / "f.safetensors"
    argv = ["estimate", "--model", f"cli_models:{factory_name}", "--data", str(tmp_path / "d.npz")]
    argv += ["--kind", "exact", "--batch-size", "16", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    F = ff.load(out)
    import cli_models

    model = getattr(cli_models, factory_name)()
    expected = ff.estimate(
        model,
        load_data(str(tmp_path / "d.npz"), 16, dtype=next(model.parameters()).dtype),
        "categorical",
        "exact",
        progress=False,
    )
    assert F.num_samples == 40
    torch.testing.assert_close(F.to_dense(), expected.to_dense())


def test_demo_writes_a_report_with_every_kind_and_structure(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--rows", "64", "--rank", "5"]) == 0
    progress = capsys.readouterr().err
    for step in ("[1/2] MLP: trained", "[2/2] CNN: kind 'empirical'", "wrote cnn_heatmaps.png"):
        assert step in progress
    report = (tmp_path / "README.md").read_text()
    assert "Grey stripes: the " in report and "decades below the largest entry" in report
    for model in ("MLP", "CNN"):
        assert f"## {model}" in report
        for png in ("heatmaps", "spectra"):
            assert (tmp_path / f"{model.lower()}_{png}.png").stat().st_size > 1000
    rows = [line for line in report.splitlines() if line.startswith("| exact |")]
    assert len(rows) == 2 * 6
    # dense exact is the reference itself: zero error, trace recovered exactly
    dense_rows = [r for r in rows if r.startswith("| exact | dense |")]
    assert all(
        r.split("|")[3].strip() == "0" and r.split("|")[4].strip() == "1.000" for r in dense_rows
    )
