import argparse
import re

import pytest

from fisherflow.cli import stats as stats_cli


def _parser():
    parser = argparse.ArgumentParser(prog="fisherflow")
    sub = parser.add_subparsers(dest="command")
    stats_cli.register(sub)
    return parser


def test_stats_cli_writes_plots_and_markdown(tmp_path):
    out = tmp_path / "report"
    args = _parser().parse_args(["stats", "--out", str(out), "--points", "16"])
    assert args.func is stats_cli.run
    assert args.func(args) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        "fisher_information.png",
        "fisher_rao_geodesic.png",
        "jeffreys_prior.png",
        "stats.md",
    }
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "stats.md").read_text()
    for png in ("fisher_information.png", "fisher_rao_geodesic.png", "jeffreys_prior.png"):
        assert f"({png})" in md
    assert "4.7619" in md
    closed, numerical = map(
        float, re.search(r"closed form ([\d.]+), numerical ([\d.]+)", md).groups()
    )
    assert abs(closed - numerical) < 1e-4 * closed
    assert "3.14159" in md


def test_stats_cli_rejects_bad_points(tmp_path, capsys):
    from fisherflow.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--out", str(tmp_path), "--points", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "fisherflow: error: --points must be an integer >= 2, got 1\n"
    )
