"""The ``fisherflow`` command: estimate → file → inspect, the demo, and clean errors."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["estimate", "--model", "no_colon", "--out", "x.safetensors"], "module:factory"),
        (
            ["estimate", "--model", "cli_models:not_a_model", "--out", "x.safetensors"],
            "must return an nn.Module",
        ),
        (
            [
                "estimate",
                "--model",
                "cli_models:mlp",
                "--data",
                "data.csv",
                "--out",
                "x.safetensors",
            ],
            "--data must be",
        ),
        (["inspect", "missing.safetensors"], "no Fisher file"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    tmp_path, factory, capsys, monkeypatch, argv, message
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fisherflow: error:") and message in err


def test_demo_writes_a_report_with_every_kind_and_structure(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--rows", "64", "--rank", "5"]) == 0
    report = (tmp_path / "README.md").read_text()
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
