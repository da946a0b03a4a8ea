"""torchrun (gloo, 2 processes): the distributed estimate equals the single-process one."""

from pathlib import Path

import pytest


@pytest.mark.distributed
def test_distributed_equals_single_process(tmp_path, torchrun):
    out = torchrun(Path(__file__).with_name("dist_worker.py"), cwd=tmp_path, timeout=240)
    assert "DISTRIBUTED-OK" in out
