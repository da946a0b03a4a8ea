"""``all_reduce`` under ``torchrun --nproc_per_node=2`` (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .cases import make


@pytest.mark.distributed
def test_all_reduce_matches_single_process_sum():
    worker = Path(__file__).with_name("dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(worker),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("all_reduce ok") == 2


def test_all_reduce_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        make("dense", "tiny").all_reduce()
