"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import fisherflow

#: The fisherflow under test (a worktree's ``src``, not necessarily an installed copy)
#: and the repository root (workers import ``tests.*`` helpers).
SRC = Path(fisherflow.__file__).resolve().parents[1]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_wall_clock_cost_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact kind's cost notice fires on estimated wall-clock seconds, which a loaded
    machine inflates: off in every test, so warnings-as-errors cannot depend on the load.
    The tests of the notice set ``LONG_SECONDS`` themselves."""
    from fisherflow.estimation import positions

    monkeypatch.setattr(positions, "LONG_SECONDS", float("inf"))


def _torchrun(worker: Path, *args: str, cwd: Path, timeout: float = 300) -> str:
    """Run ``worker`` under ``torchrun --nproc_per_node=2`` (gloo); return its stdout.

    Fails the test with the tail of both streams if the run exits non-zero.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(ROOT), env.get("PYTHONPATH", "")])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        str(worker),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def torchrun() -> Callable[..., str]:
    """``torchrun(worker, *args, cwd=..., timeout=...)``: a 2-process gloo run's stdout."""
    return _torchrun
