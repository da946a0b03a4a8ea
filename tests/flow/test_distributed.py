import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_dist_worker.py")


@pytest.mark.distributed
def test_torchrun_two_ranks_equal_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "src"), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(rank, res)
        assert res["fused_vs_single"] == 0.0  # same operations, same order
        assert res["info_vs_single"] == 0.0
        assert res["structured_vs_single"] == 0.0  # K-FAC, EKFAC, low-rank: same order too
        assert res["fused_vs_pooled"] < 1e-10
        assert res["allreduce_vs_xtx"] < 1e-9
        assert res["glm_params_rel"] < 1e-9 and res["glm_bse_rel"] < 1e-9
        assert res["glm_nobs"] == 6366
