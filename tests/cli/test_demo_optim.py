"""The optimizer section of ``fisherflow demo`` writes its plots and table (a short run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fisherflow.cli import demo, demo_optim


def test_demo_section_writes_losses_and_fishers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_optim, "STEPS", 20)
    lines = demo_optim.demo_section(tmp_path)
    assert "demo_optim" in demo.SECTIONS
    assert (tmp_path / "optim_losses.png").stat().st_size > 0
    assert (tmp_path / "optim_fishers.png").stat().st_size > 0
    rows = [line for line in lines if line.startswith("| ") and "optimizer" not in line]
    assert len(rows) == len(demo_optim._optimizers())
